"""Export folders of several ONNX files as one model: a BART folder laid out as Optimum writes it
(``encoder_model.onnx`` exported alone, so its node names fit decoder targets too; ``decoder_model.onnx``;
``decoder_with_past_model.onnx`` taking the self- and cross-attention caches, so the cross-attention k/v
projections are not in it; ``decoder_model_merged.onnx`` with Optimum's ``If`` over the shared weights;
``config.json``). merge, inject (served by ``LoraFolderSession``), inspect and build, each checked against
PEFT; the base weights (``--base-weights``) prove the cross-attention k/v targets absent from the with-past
decoder."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import saved_peft_reference
from foreign_graphs import export_submodule, run_plain, wrap_in_if

from lora_export.cli import cli
from lora_export.runtime.folder_session import LoraFolderSession

TARGETS = ["q_proj", "v_proj", "fc1"]


class _Decoder(torch.nn.Module):
    """The decoder as Optimum exports it: inputs by name, nodes scoped ``/decoder/layers.0/...``."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask):
        out = self.decoder(
            input_ids=input_ids,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            use_cache=False,
        )
        return out.last_hidden_state


class _DecoderWithPast(torch.nn.Module):
    """Optimum's decoder_with_past: one new token; the caches ``past_key_values.<i>.(decoder|encoder).(key|value)``."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        n = len(past) // 4
        cache = EncoderDecoderCache(
            DynamicCache([(past[4 * i], past[4 * i + 1]) for i in range(n)]),
            DynamicCache([(past[4 * i + 2], past[4 * i + 3]) for i in range(n)]),
        )
        out = self.decoder(
            input_ids=input_ids,
            encoder_hidden_states=encoder_hidden_states,  # unused: the cross-attention cache replaces it
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=cache,
            use_cache=True,
        )
        return out.last_hidden_state


PAST_NAMES = [
    f"past_key_values.{i}.{k}"
    for i in range(2)
    for k in ("decoder.key", "decoder.value", "encoder.key", "encoder.value")
]


def _past(decoder, enc_hidden, mask, dec: torch.Tensor) -> list[torch.Tensor]:
    """The caches after all but the last decoder token, as the with-past file takes them."""
    with torch.no_grad():
        c = decoder(
            input_ids=dec[:, :-1], encoder_hidden_states=enc_hidden, encoder_attention_mask=mask, use_cache=True
        )
    c = c.past_key_values
    self_c, cross_c = c.self_attention_cache.layers, c.cross_attention_cache.layers
    return [t for i in range(2) for t in (self_c[i].keys, self_c[i].values, cross_c[i].keys, cross_c[i].values)]


def _export_decoder_with_past(base, enc_inputs: dict, dec: torch.Tensor, out: Path) -> Path:
    with torch.no_grad():
        hidden = base.encoder(**enc_inputs).last_hidden_state
    past = _past(base.decoder, hidden, enc_inputs["attention_mask"], dec)
    m = _DecoderWithPast(copy.deepcopy(base.decoder)).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (dec[:, -1:], hidden, enc_inputs["attention_mask"], *past),
            str(out),
            input_names=["input_ids", "encoder_hidden_states", "encoder_attention_mask", *PAST_NAMES],
            output_names=["last_hidden_state"],
            dynamo=False,
            opset_version=17,
        )
    return out


def _export_decoder(base, enc_inputs: dict, dec_ids: torch.Tensor, out: Path) -> Path:
    m = _Decoder(copy.deepcopy(base.decoder)).eval()
    with torch.no_grad():
        hidden = base.encoder(**enc_inputs).last_hidden_state
    args = (dec_ids, hidden, enc_inputs["attention_mask"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            args,
            str(out),
            input_names=["input_ids", "encoder_hidden_states", "encoder_attention_mask"],
            output_names=["last_hidden_state"],
            dynamo=False,
            opset_version=17,
        )
    return out


def _inputs(seed: int) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    enc = {"input_ids": torch.randint(0, 100, (2, 7), generator=g), "attention_mask": mask}
    return enc, torch.randint(0, 100, (2, 5), generator=g)


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    """A tiny BART, its Optimum-style export folder, and PEFT adapters: encoder+decoder, encoder only."""
    from transformers import BartConfig, BartModel

    root = tmp_path_factory.mktemp("bart")
    cfg = BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    base = BartModel(cfg).eval()
    folder = root / "onnx"
    folder.mkdir()
    enc, dec = _inputs(0)
    export_submodule(base.encoder, enc, folder / "encoder_model.onnx")
    _export_decoder(base, enc, dec, folder / "decoder_model.onnx")
    _export_decoder_with_past(base, enc, dec, folder / "decoder_with_past_model.onnx")
    wrap_in_if(folder / "decoder_model.onnx", folder / "decoder_model_merged.onnx")
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    both = saved_peft_reference(base, root / "both", r=4, lora_alpha=8, target_modules=TARGETS)
    enc_only = saved_peft_reference(
        base, root / "enc", seed=2, r=2, lora_alpha=4, target_modules=r"encoder\.layers\..*\.(q_proj|v_proj)"
    )
    from safetensors.numpy import save_file

    save_file({k: v.detach().numpy().copy() for k, v in base.state_dict().items()}, str(root / "base.safetensors"))
    adapters = {"both": (both, root / "both"), "enc": (enc_only, root / "enc")}
    return base, folder, adapters, root / "base.safetensors"


def _peft_outputs(peft_model, enc: dict, dec: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return peft_model(**enc, decoder_input_ids=dec).last_hidden_state.numpy()


def _with_past_feeds(peft_model, enc: dict, dec: torch.Tensor) -> dict[str, np.ndarray]:
    """The with-past file's feeds for the last token: the caches PEFT's decoder (adapter active) builds."""
    inner = peft_model.base_model.model
    with torch.no_grad():
        hidden = inner.encoder(**enc).last_hidden_state
    past = _past(inner.decoder, hidden, enc["attention_mask"], dec)
    feeds = {"input_ids": dec[:, -1:].numpy(), "encoder_attention_mask": enc["attention_mask"].numpy()}
    return {**feeds, **{n: t.numpy() for n, t in zip(PAST_NAMES, past)}}


def _decode(run, peft_model, enc: dict, dec: torch.Tensor, decoder_file: str) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX, PEFT) decoder outputs: encoder then decoder as a seq2seq runtime runs them (``run(file, feeds)``);
    the with-past file gets the last token and the caches, and is compared on that position."""
    expected = _peft_outputs(peft_model, enc, dec)
    if decoder_file == "decoder_with_past_model.onnx":
        return run(decoder_file, _with_past_feeds(peft_model, enc, dec))[0], expected[:, -1:]
    feeds = {k: v.numpy() for k, v in enc.items()}
    hidden = run("encoder_model.onnx", feeds)[0]
    dfeeds = {
        "input_ids": dec.numpy(),
        "encoder_hidden_states": hidden,
        "encoder_attention_mask": feeds["attention_mask"],
    }
    if decoder_file == "decoder_model_merged.onnx":
        dfeeds["use_cache_branch"] = np.array(True)
    return run(decoder_file, dfeeds)[0], expected


def _assert_close(actual, expected) -> None:
    scale = np.abs(expected).max()
    assert scale > 0 and np.abs(actual - expected).max() <= 1e-5 * max(scale, 1.0)


def _plain(folder: Path):
    return lambda f, feeds: run_plain(folder / f, feeds)


DECODERS = ["decoder_model.onnx", "decoder_with_past_model.onnx", "decoder_model_merged.onnx"]


def test_merge_folder_matches_peft(bart, tmp_path):
    base, folder, adapters, weights = bart
    peft_model, adapter_dir = adapters["both"]
    out = tmp_path / "merged"
    args = ["merge", str(folder), str(adapter_dir), "-o", str(out), "--base-weights", str(weights), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    enc, dec = _inputs(9)
    for decoder_file in DECODERS:
        got, expected = _decode(_plain(out), peft_model, enc, dec, decoder_file)
        _assert_close(got, expected)
        before, _ = _decode(_plain(folder), peft_model, enc, dec, decoder_file)
        assert np.abs(before - expected).max() > 1e-3  # the adapter has an effect to check
    # The If's other branch reads the same merged weights.
    feeds = {k: v.numpy() for k, v in enc.items()}
    hidden = run_plain(out / "encoder_model.onnx", feeds)[0]
    dfeeds = {
        "input_ids": dec.numpy(),
        "encoder_hidden_states": hidden,
        "encoder_attention_mask": feeds["attention_mask"],
    }
    no_past = run_plain(out / "decoder_model_merged.onnx", {**dfeeds, "use_cache_branch": np.array(False)})[0]
    _assert_close(no_past, _peft_outputs(peft_model, enc, dec))


def test_encoder_only_adapter_leaves_decoders_byte_identical(bart, tmp_path):
    base, folder, adapters, _ = bart
    peft_model, adapter_dir = adapters["enc"]
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(folder), str(adapter_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    for f in DECODERS:
        assert (out / f).read_bytes() == (folder / f).read_bytes()
    enc, dec = _inputs(4)
    _assert_close(*_decode(_plain(out), peft_model, enc, dec, "decoder_model.onnx"))


def test_inject_folder_served_by_folder_session(bart, tmp_path):
    base, folder, adapters, weights = bart
    out = tmp_path / "served"
    args = ["inject", str(folder), f"both={adapters['both'][1]}", f"enc={adapters['enc'][1]}", "-o", str(out)]
    result = CliRunner().invoke(cli, [*args, "--base-weights", str(weights)])
    assert result.exit_code == 0, result.output
    assert (out / "both.decoder_with_past_model.onnx_adapter").is_file()
    assert (out / "enc.encoder_model.onnx_adapter").is_file()
    assert not (out / "enc.decoder_model.onnx_adapter").exists()  # no decoder targets: no tensors there
    session = LoraFolderSession(out, providers=["CPUExecutionProvider"])
    session.load_adapter("both")
    session.load_adapter("enc")
    enc, dec = _inputs(6)
    for name in ("both", "enc"):

        def run(f, feeds, name=name):
            known = {i.name for i in session.session(f).get_inputs()}
            return session.run(f, None, {k: v for k, v in feeds.items() if k in known}, adapter=name)

        for decoder_file in DECODERS:
            _assert_close(*_decode(run, adapters[name][0], enc, dec, decoder_file))
    feeds = {k: v.numpy() for k, v in enc.items()}
    np.testing.assert_allclose(
        session.run("encoder_model.onnx", None, feeds)[0], run_plain(folder / "encoder_model.onnx", feeds)[0], atol=1e-6
    )


def test_target_not_proven_absent_from_a_decoder_variant_is_refused(bart, tmp_path):
    """The cross-attention v_proj is in decoder_model.onnx, not in decoder_with_past_model.onnx (it reads the
    cache): without base weights to prove it absent there, the folder is refused, not merged in one only."""
    _, folder, adapters, _ = bart
    result = CliRunner().invoke(cli, ["merge", str(folder), str(adapters["both"][1]), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "encoder_attn.v_proj" in line and "decoder_with_past_model.onnx" in line
    assert "--base-weights" in line and not (tmp_path / "out").exists()


def test_target_in_no_file_is_refused(bart, tmp_path):
    _, folder, adapters, _ = bart
    only_encoder = tmp_path / "onnx"
    only_encoder.mkdir()
    shutil.copyfile(folder / "encoder_model.onnx", only_encoder / "encoder_model.onnx")
    result = CliRunner().invoke(cli, ["merge", str(only_encoder), str(adapters["both"][1]), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "found in no file" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_inspect_folder_says_where_each_target_goes(bart):
    _, folder, adapters, weights = bart
    args = ["inspect", str(folder), str(adapters["both"][1]), "--base-weights", str(weights), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["files"]) == {"encoder_model.onnx", *DECODERS}
    where = report["targets"]["decoder.layers.0.self_attn.q_proj"]
    assert where == {f: "matched" for f in DECODERS}
    assert report["targets"]["decoder.layers.0.encoder_attn.v_proj"]["decoder_with_past_model.onnx"] == "absent"
    assert report["targets"]["encoder.layers.1.fc1"] == {"encoder_model.onnx": "matched"}


def test_build_recipe_on_a_model_folder(bart, tmp_path):
    """``lora-export build`` with ``model = "<folder>"``: merged and injected folders, each file verified on
    its own inputs against PEFT's encoder and decoders (keys ``<file>/<name>``)."""
    _, folder, adapters, weights = bart
    peft_model, adapter_dir = adapters["both"]
    inner = peft_model.base_model.model
    enc, dec = _inputs(21)
    hidden = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        enc_out = inner.encoder(**enc).last_hidden_state.numpy()
        dec_out = inner.decoder(
            input_ids=dec, encoder_hidden_states=hidden, encoder_attention_mask=enc["attention_mask"], use_cache=False
        ).last_hidden_state.numpy()
    inputs = {f"encoder_model.onnx/{k}": v.numpy() for k, v in enc.items()}
    inputs.update(
        {
            "decoder_model.onnx/input_ids": dec.numpy(),
            "decoder_model.onnx/encoder_hidden_states": hidden.numpy(),
            "decoder_model.onnx/encoder_attention_mask": enc["attention_mask"].numpy(),
        }
    )
    inputs.update({f"decoder_with_past_model.onnx/{k}": v for k, v in _with_past_feeds(peft_model, enc, dec).items()})
    refs = {
        "encoder_model.onnx/last_hidden_state": enc_out,
        "decoder_model.onnx/last_hidden_state": dec_out,
        "decoder_with_past_model.onnx/last_hidden_state": _peft_outputs(peft_model, enc, dec)[:, -1:],
    }
    np.savez(tmp_path / "inputs.npz", **inputs)
    np.savez(tmp_path / "ref.npz", **refs)
    (tmp_path / "recipe.toml").write_text(
        f'[base]\nmodel = "{folder}"\nbase_weights = "{weights}"\n[adapters]\nboth = "{adapter_dir}"\n'
        '[[artifact]]\nkind = "merged"\nadapters = ["both"]\n[[artifact]]\nkind = "injected"\nadapters = ["both"]\n'
        '[verify]\ninputs = "inputs.npz"\nreferences = { both = "ref.npz" }\ntolerance = 1e-5\nrtol = 1e-4\n'
    )
    result = CliRunner().invoke(cli, ["build", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "dist"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for art in report["artifacts"]:
        figs = art["verification"]["adapters"]["both"]
        assert {f["output"] for f in figs} == set(refs) and all(f["passed"] for f in figs)
    merged = tmp_path / "dist" / "merged" / "both"
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert (tmp_path / "dist" / "injected" / "both.decoder_model.onnx_adapter").is_file()
    # A wrong reference for one file fails the build (exit 1), DIST untouched.
    np.savez(tmp_path / "ref.npz", **{"decoder_model.onnx/last_hidden_state": dec_out + 0.01})
    before = (tmp_path / "dist" / "manifest.json").read_bytes()
    failed = CliRunner().invoke(cli, ["build", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "dist")])
    assert failed.exit_code == 1 and "decoder_model.onnx/last_hidden_state" in failed.stderr, failed.output
    assert (tmp_path / "dist" / "manifest.json").read_bytes() == before

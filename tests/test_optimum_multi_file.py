"""Multi-file models on REAL Optimum exports (``optimum-onnx``'s ``main_export``, task
``text2text-generation-with-past``) of tiny random-init BART and T5: ``merge`` and ``inject`` on the export
folder, run in ONNX Runtime (encoder, decoder, decoder_with_past after an ONNX prefill, and the merged decoder's
two ``If`` branches) against PEFT applied to the same weights in PyTorch.

Optimum pins transformers < 4.58, so the graphs are exported in a side venv by ``make optimum-graphs``
(tests/side/optimum_export.sh) into tests/.optimum-graphs/; ``make test`` builds them first. Here they are only
read: when absent the tests fail, saying how to build them."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lora_export.cli import cli
from lora_export.runtime.folder_session import LoraFolderSession

GRAPHS = Path(__file__).parent / ".optimum-graphs"
TARGETS = {"bart": ["q_proj", "v_proj"], "t5": ["q", "v"]}
CROSS_V = {"bart": "encoder_attn.v_proj", "t5": "EncDecAttention.v"}  # reads the cache in decoder_with_past
DECODERS = ["decoder_model.onnx", "decoder_with_past_model.onnx", "decoder_model_merged.onnx"]
RTOL = 1e-4


def _graphs(name: str) -> Path:
    root = GRAPHS / name
    if not (root / "COMPLETE").is_file():
        pytest.fail(f"the Optimum exports are missing in {root}: run `make optimum-graphs` (or `make test`)")
    return root


@pytest.fixture(scope="module", params=sorted(TARGETS))
def model(request, tmp_path_factory):
    """(name, Optimum folder, PEFT model, merged folder, injected folder), merge and inject run once."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    name = request.param
    root = _graphs(name)
    tmp = tmp_path_factory.mktemp(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForSeq2SeqLM.from_pretrained(root / "hf").eval()
        torch.manual_seed(3)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], init_lora_weights=False)
        peft_model = get_peft_model(base, config).eval()
        peft_model.save_pretrained(str(tmp / "adapter"))
    folder, weights = root / "onnx", str(root / "hf" / "model.safetensors")
    outs = {}
    for verb, adapter in (("merge", str(tmp / "adapter")), ("inject", f"a={tmp / 'adapter'}")):
        outs[verb] = tmp / verb
        args = [verb, str(folder), adapter, "-o", str(outs[verb]), "--base-weights", weights]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    return name, folder, peft_model, outs["merge"], outs["inject"], tmp / "adapter"


def _inputs(seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Fresh random encoder ids (one row padded) and decoder ids."""
    rng = np.random.default_rng(seed)
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, -2:] = 0
    enc = {"input_ids": rng.integers(3, 96, (2, 7), dtype=np.int64), "attention_mask": mask}
    return enc, rng.integers(3, 96, (2, 5), dtype=np.int64)


def _peft(peft_model, enc: dict, dec: np.ndarray) -> dict[str, np.ndarray]:
    """PEFT's encoder states, full-sequence logits, and the prefill's caches (all but the last token)."""
    t = {k: torch.from_numpy(v) for k, v in enc.items()}
    d = torch.from_numpy(dec)
    with torch.no_grad():
        full = peft_model(**t, decoder_input_ids=d, use_cache=False)
        pre = peft_model(**t, decoder_input_ids=d[:, :-1], use_cache=True)
    cache = pre.past_key_values
    ref = {"last_hidden_state": full.encoder_last_hidden_state.numpy(), "logits": full.logits.numpy()}
    for i, (s, c) in enumerate(zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers)):
        for kind, layer in (("decoder", s), ("encoder", c)):
            ref[f"present.{i}.{kind}.key"] = layer.keys.numpy()
            ref[f"present.{i}.{kind}.value"] = layer.values.numpy()
    return ref


def _close(actual: np.ndarray, expected: np.ndarray, what: str) -> float:
    """The max error relative to the reference's scale; fails above ``RTOL``."""
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual - expected).max()) / scale
    assert scale > 0 and actual.shape == expected.shape and err <= RTOL, f"{what}: rel err {err:.2e}"
    return err


def _check_folder(run, peft_model, seed: int) -> dict[str, float]:
    """Run the folder as a seq2seq runtime does (``run(file, feeds) -> {output: array}``) and compare every
    step with PEFT: encoder; decoder on the whole sequence; an ONNX prefill (decoder_model on all but the last
    token) whose caches feed decoder_with_past and the merged decoder's cache branch for the last token; the
    merged decoder's no-cache branch on the whole sequence."""
    enc, dec = _inputs(seed)
    ref = _peft(peft_model, enc, dec)
    errs = {"encoder": _close(run("encoder_model.onnx", enc)["last_hidden_state"], ref["last_hidden_state"], "enc")}
    hidden = run("encoder_model.onnx", enc)["last_hidden_state"]
    common = {"encoder_attention_mask": enc["attention_mask"]}
    full = run("decoder_model.onnx", {**common, "input_ids": dec, "encoder_hidden_states": hidden})
    errs["decoder"] = _close(full["logits"], ref["logits"], "decoder logits")
    pre = run("decoder_model.onnx", {**common, "input_ids": dec[:, :-1], "encoder_hidden_states": hidden})
    past = {k.replace("present", "past_key_values"): v for k, v in pre.items() if k.startswith("present")}
    for k, v in pre.items():
        if k.startswith("present"):
            errs["prefill caches"] = max(errs.get("prefill caches", 0.0), _close(v, ref[k], k))
    step = run("decoder_with_past_model.onnx", {**common, "input_ids": dec[:, -1:], **past})
    errs["decoder_with_past"] = _close(step["logits"], ref["logits"][:, -1:], "with-past logits")
    merged = {**common, "input_ids": dec[:, -1:], "encoder_hidden_states": hidden, **past}
    step = run("decoder_model_merged.onnx", {**merged, "use_cache_branch": np.array([True])})
    errs["merged, cache branch"] = _close(step["logits"], ref["logits"][:, -1:], "merged cache-branch logits")
    # The no-cache branch ignores the caches but still takes them: empty self-attention ones, as Optimum feeds.
    empty = {k: (v[:, :, :0] if ".decoder." in k else v) for k, v in past.items()}
    nocache = {**merged, **empty, "input_ids": dec, "use_cache_branch": np.array([False])}
    errs["merged, no-cache branch"] = _close(
        run("decoder_model_merged.onnx", nocache)["logits"], ref["logits"], "merged no-cache logits"
    )
    return errs


def _plain(folder: Path):
    import onnxruntime as ort

    sessions: dict[str, ort.InferenceSession] = {}

    def run(file: str, feeds: dict) -> dict[str, np.ndarray]:
        if file not in sessions:
            sessions[file] = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
        s = sessions[file]
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))

    return run


def test_optimum_export_has_every_decoder(model):
    name, folder, *_ = model
    assert {"encoder_model.onnx", *DECODERS} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text())["model_type"] == name


def test_merged_optimum_folder_matches_peft(model):
    _, folder, peft_model, merged, *_ = model
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in folder.iterdir())
    errs = _check_folder(_plain(merged), peft_model, seed=11)
    assert set(errs) >= {"encoder", "decoder", "decoder_with_past", "merged, cache branch"}
    # The adapter has an effect to check, in the encoder and in the decoders: the untouched export is far from
    # PEFT, and so are the untouched decoders fed by the merged encoder.
    with pytest.raises(AssertionError, match="enc: rel err"):
        _check_folder(_plain(folder), peft_model, seed=11)
    merged_run, base_run = _plain(merged), _plain(folder)
    hybrid = lambda f, feeds: (merged_run if f == "encoder_model.onnx" else base_run)(f, feeds)  # noqa: E731
    with pytest.raises(AssertionError, match="decoder logits: rel err"):
        _check_folder(hybrid, peft_model, seed=11)


def test_injected_optimum_folder_served_by_folder_session_matches_peft(model):
    _, folder, peft_model, _, injected, _ = model
    session = LoraFolderSession(injected, providers=["CPUExecutionProvider"])
    session.load_adapter("a")
    for f in ("encoder_model.onnx", *DECODERS):
        assert (injected / f"a.{Path(f).stem}.onnx_adapter").is_file()

    def run(file: str, feeds: dict) -> dict[str, np.ndarray]:
        names = [o.name for o in session.session(file).get_outputs()]
        return dict(zip(names, session.run(file, None, feeds, adapter="a")))

    _check_folder(run, peft_model, seed=12)
    # With no adapter active the injected folder computes the untouched export.
    enc, _ = _inputs(13)
    base = session.run("encoder_model.onnx", None, enc)[0]
    np.testing.assert_allclose(base, _plain(folder)("encoder_model.onnx", enc)["last_hidden_state"], atol=1e-6)


def test_inspect_optimum_folder_says_where_each_target_goes(model):
    name, folder, peft_model, *_, adapter = model
    weights = str(folder.parent / "hf" / "model.safetensors")
    result = CliRunner().invoke(cli, ["inspect", str(folder), str(adapter), "--base-weights", weights, "--json"])
    assert result.exit_code == 0, result.output
    targets = json.loads(result.stdout)["targets"]
    peft_targets = {k for k in peft_model.base_model.model.state_dict() if ".lora_A." in k}
    assert len(targets) == len(peft_targets) == 12  # q and v of 2 encoder layers, 2 x (self + cross) decoder
    for target, where in targets.items():
        if ".encoder." in f".{target}":
            assert where == {"encoder_model.onnx": "matched"}, target
        elif target.endswith(CROSS_V[name]):
            assert where == {**{f: "matched" for f in DECODERS}, "decoder_with_past_model.onnx": "absent"}, target
        else:
            assert where == {f: "matched" for f in DECODERS}, target


def test_cross_attention_target_without_base_weights_is_refused(model, tmp_path):
    """The real with-past decoder has no cross-attention v projection (it reads the cache): without the
    base weights to prove it absent there, the folder is refused in one line, nothing written."""
    name, folder, *_, adapter = model
    result = CliRunner().invoke(cli, ["merge", str(folder), str(adapter), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and CROSS_V[name] in line and "decoder_with_past_model.onnx" in line
    assert "--base-weights" in line and not (tmp_path / "out").exists()


def test_missing_graphs_fail_with_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "GRAPHS", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="make optimum-graphs"):
        _graphs("bart")

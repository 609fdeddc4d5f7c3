"""Exit 0 means exact on graphs shaped like other tools' exports: each test guards a case where merge or
inject used to exit 0 with a model that computed something else. PEFT's unmerged model is the reference,
on fresh random inputs; every refusal is checked to leave no output behind."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, peft_reference, saved_peft_reference
from foreign_graphs import export_submodule, run_injected, run_plain, tie_lm_head, wrap_in_if
from inject_fixtures import export_base, feeds_of
from models import tiny_gpt2, tiny_llama
from onnx_fixtures import export_onnx
from safetensors.numpy import load_file, save_file

from lora_export import inject_files, load_adapter, merge_file
from lora_export.cli import cli
from lora_export.errors import ShapeError, TargetError


def rel_err(actual: np.ndarray, expected) -> float:
    exp = expected.detach().float().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    return float(np.abs(actual - exp).max() / np.abs(exp).max())


def _effect(base_out, ref) -> float:
    return rel_err(np.asarray(base_out), ref)


# -- 1. PEFT's default save of embedding / lm_head adapters ------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-embed")
    base, make_inputs = tiny_llama()
    onnx_path = export_base(base, make_inputs(0), root / "base.onnx")
    return base, make_inputs, onnx_path, root


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head", "q_proj"]], ids=["embed", "lm_head"])
def test_peft_stored_base_weight_never_undoes_the_delta(llama, tmp_path, targets):
    """PEFT stores ``<embed|lm_head>.base_layer.weight`` beside the LoRA tensors: it is the base, not a new
    weight. merge used to fold the delta and then overwrite it with that stored base."""
    base, make_inputs, onnx_path, _ = llama
    adapter_dir = tmp_path / "adapter"
    peft_model = saved_peft_reference(base, adapter_dir, r=4, lora_alpha=8, target_modules=targets)
    stored = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any(k.endswith(".base_layer.weight") for k in stored), "PEFT no longer stores the base layer"
    inputs = make_inputs(7)
    ref = output_of(peft_model, inputs)
    assert _effect(run_plain(onnx_path, feeds_of(inputs))[0], ref) > 1e-3
    merge_file(onnx_path, adapter_dir, tmp_path / "merged.onnx")
    assert rel_err(run_plain(tmp_path / "merged.onnx", feeds_of(inputs))[0], ref) <= 1e-5
    # inject used to refuse such adapters; the stored base is checked and the adapter served.
    inject_files(onnx_path, [adapter_dir], tmp_path / "served")
    out = run_injected(
        tmp_path / "served" / "model.onnx", tmp_path / "served" / "adapter.onnx_adapter", feeds_of(inputs)
    )
    assert rel_err(out[0], ref) <= 1e-5


def test_peft_stored_base_weight_that_differs_is_refused(llama, tmp_path):
    """An adapter whose stored base is not the model's was trained on another base: refuse, never guess."""
    from lora_export import convert_adapter

    base, _, onnx_path, _ = llama
    adapter_dir = tmp_path / "adapter"
    saved_peft_reference(base, adapter_dir, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    served = tmp_path / "first"
    inject_files(onnx_path, [adapter_dir], served)
    convert_adapter(adapter_dir, served / "model.onnx", tmp_path / "same.onnx_adapter")
    f = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key] = tensors[key] + np.float32(0.5)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ShapeError, match="differs from the model's"):
        merge_file(onnx_path, adapter_dir, tmp_path / "merged.onnx")
    with pytest.raises(ShapeError, match="differs from the model's"):
        inject_files(onnx_path, [adapter_dir], tmp_path / "served")
    with pytest.raises(ShapeError, match="differs from the model's"):
        convert_adapter(adapter_dir, served / "model.onnx", tmp_path / "other.onnx_adapter")
    assert not (tmp_path / "other.onnx_adapter").exists()
    assert not (tmp_path / "merged.onnx").exists() and not (tmp_path / "served").exists()


def test_stored_base_round_trips(tmp_path):
    from lora_export import save_adapter_files

    base, _ = tiny_llama()
    saved_peft_reference(base, tmp_path / "a", r=2, lora_alpha=2, target_modules=["embed_tokens"])
    adapter = load_adapter(tmp_path / "a")
    assert list(adapter.stored_base) == ["model.embed_tokens"] and not adapter.extra
    save_adapter_files(adapter, tmp_path / "b")
    again = load_adapter(tmp_path / "b")
    np.testing.assert_array_equal(again.stored_base["model.embed_tokens"], adapter.stored_base["model.embed_tokens"])


# -- 2. Tied weights (Optimum's GPT-2: one wte for the embedding and lm_head) -------------------------


@pytest.fixture(scope="module")
def gpt2_tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2-tied")
    base, make_inputs = tiny_gpt2()
    plain = export_onnx(base, make_inputs(0), root / "plain.onnx", dynamo=False)
    tied = tie_lm_head(plain, root / "tied.onnx", "model.transformer.wte.weight", "/model/lm_head/MatMul")
    return base, make_inputs, tied


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True),
        dict(target_modules=["lm_head"]),
    ],
    ids=["wte", "lm_head"],
)
def test_tied_weight_changes_only_the_targeted_module(gpt2_tied, tmp_path, config):
    """An adapter on one of two tied modules must not change the other (logits were off by 641)."""
    base, make_inputs, tied = gpt2_tied
    adapter_dir = tmp_path / "adapter"
    peft_model = saved_peft_reference(base, adapter_dir, r=4, lora_alpha=8, **config)
    inputs = make_inputs(3)
    ref = output_of(peft_model, inputs)
    feeds = feeds_of(inputs)
    assert _effect(run_plain(tied, feeds)[0], ref) > 1e-3
    report = merge_file(tied, adapter_dir, tmp_path / "merged.onnx")
    assert any(m.get("private_copy_of") == "model.transformer.wte.weight" for m in report.merged)
    assert rel_err(run_plain(tmp_path / "merged.onnx", feeds)[0], ref) <= 1e-5
    inject_files(tied, [adapter_dir], tmp_path / "served")
    served = tmp_path / "served"
    assert rel_err(run_injected(served / "model.onnx", served / "adapter.onnx_adapter", feeds)[0], ref) <= 1e-5
    np.testing.assert_allclose(run_plain(served / "model.onnx", feeds)[0], run_plain(tied, feeds)[0], atol=1e-6)


# -- 4. A sub-module encoder: names fit the encoder and the decoder targets alike ----------------------


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    from transformers import BartConfig, BartModel

    root = tmp_path_factory.mktemp("bart")
    cfg = BartConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    base = BartModel(cfg).eval()

    def make_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, -2:] = 0
        return {"input_ids": torch.randint(0, 100, (2, 7), generator=g), "attention_mask": mask}

    encoder = export_submodule(base.encoder, make_inputs(0), root / "encoder_model.onnx")
    adapter_dir = root / "adapter"
    peft_model = saved_peft_reference(base, adapter_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    inputs = make_inputs(11)
    with torch.no_grad():
        ref = peft_model.get_encoder()(**inputs)[0]
    weights = root / "base.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in base.state_dict().items()}, str(weights))
    return encoder, adapter_dir, feeds_of(inputs), ref, weights


def test_submodule_encoder_ambiguous_names_refused(bart, tmp_path):
    """``layers.0.self_attn.q_proj`` fits encoder and decoder targets: merge and inject refuse, naming both."""
    encoder, adapter_dir, _, _, _ = bart
    with pytest.raises(TargetError, match=r"ambiguous.*decoder\.layers\.0\.self_attn\.q_proj.*--only-targets"):
        merge_file(encoder, adapter_dir, tmp_path / "merged.onnx")
    with pytest.raises(TargetError, match="ambiguous"):
        inject_files(encoder, [adapter_dir], tmp_path / "served")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("how", ["only-targets", "base-weights"])
def test_submodule_encoder_merge_and_inject_exact(bart, tmp_path, how):
    encoder, adapter_dir, feeds, ref, weights = bart
    opts = ["--only-targets", r"^encoder\."] if how == "only-targets" else ["--base-weights", str(weights)]
    assert _effect(run_plain(encoder, feeds)[0], ref) > 1e-3
    res = CliRunner().invoke(cli, ["merge", str(encoder), str(adapter_dir), "-o", str(tmp_path / "m.onnx"), *opts])
    assert res.exit_code == 0, res.output
    assert rel_err(run_plain(tmp_path / "m.onnx", feeds)[0], ref) <= 1e-5
    res = CliRunner().invoke(cli, ["inject", str(encoder), str(adapter_dir), "-o", str(tmp_path / "s"), *opts])
    assert res.exit_code == 0, res.output
    out = run_injected(tmp_path / "s" / "model.onnx", tmp_path / "s" / "adapter.onnx_adapter", feeds)
    assert rel_err(out[0], ref) <= 1e-5
    if how == "base-weights":
        # Decoder targets are proven absent by value: their base weights are not in the encoder's graph.
        report = merge_file(encoder, adapter_dir, tmp_path / "m2.onnx", base_weights=weights)
        absent = {r.target.name for r in report.resolution.absent}
        assert absent and all(name.startswith("decoder.") for name in absent)


# -- 5. If subgraphs (Optimum's decoder_model_merged.onnx) --------------------------------------------


@pytest.fixture(scope="module")
def merged_decoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("if-decoder")
    base, make_inputs = tiny_llama()
    plain = export_base(base, make_inputs(0), root / "plain.onnx")
    return base, make_inputs, wrap_in_if(plain, root / "decoder_model_merged.onnx")


@pytest.mark.parametrize("branch", [True, False], ids=["with_past", "no_past"])
def test_if_subgraph_weights_merge_and_inject(merged_decoder, tmp_path, branch):
    base, make_inputs, model = merged_decoder
    adapter_dir = tmp_path / "adapter"
    peft_model = saved_peft_reference(
        base, adapter_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    inputs = make_inputs(5)
    ref = output_of(peft_model, inputs)
    feeds = {**feeds_of(inputs), "use_cache_branch": np.array(branch)}
    assert _effect(run_plain(model, feeds)[0], ref) > 1e-3
    report = merge_file(model, adapter_dir, tmp_path / "merged.onnx")
    assert all(len(r.nodes) == 2 for r in report.resolution.matched)  # one node per branch
    assert rel_err(run_plain(tmp_path / "merged.onnx", feeds)[0], ref) <= 1e-5
    inject_files(model, [adapter_dir], tmp_path / "served")
    served = tmp_path / "served" / "model.onnx"
    assert rel_err(run_injected(served, tmp_path / "served" / "adapter.onnx_adapter", feeds)[0], ref) <= 1e-5
    np.testing.assert_allclose(run_plain(served, feeds)[0], run_plain(model, feeds)[0], atol=1e-6)


def test_trained_bias_on_a_deduplicated_initializer(gpt2_tied, tmp_path):
    """TorchScript folds equal biases (GPT-2's zero-initialized ones) into one initializer that other
    layers read through Identity nodes: replacing one layer's trained bias must not change the others."""
    base, make_inputs, tied = gpt2_tied
    peft_model = peft_reference(base, r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    with torch.no_grad():
        inner = peft_model.base_model.model.transformer.h[0].attn.c_attn.base_layer
        inner.bias.add_(torch.randn(inner.bias.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    inputs = make_inputs(4)
    ref = output_of(peft_model, inputs)
    report = merge_file(tied, tmp_path / "adapter", tmp_path / "merged.onnx")
    assert report.replaced
    assert rel_err(run_plain(tmp_path / "merged.onnx", feeds_of(inputs))[0], ref) <= 1e-5


@pytest.mark.parametrize("limit", [None, 0], ids=["patched-save", "full-save"])
def test_private_copy_with_external_data(gpt2_tied, tmp_path, monkeypatch, limit):
    """A private merged copy is a new tensor: the patched save keeps it inline while small, and past the
    limit the full external-data save takes over; both give the adapter's model."""
    import onnx

    from lora_export.graph.model import patch_save

    if limit is not None:
        monkeypatch.setattr(patch_save, "INLINE_PATCH_LIMIT", limit)
    base, make_inputs, tied = gpt2_tied
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save(onnx.load(str(tied)), str(ext), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    adapter_dir = tmp_path / "adapter"
    peft_model = saved_peft_reference(base, adapter_dir, r=4, lora_alpha=8, target_modules=["wte"])
    inputs = make_inputs(6)
    report = merge_file(ext, adapter_dir, tmp_path / "out" / "merged.onnx")
    assert report.merged[0]["private_copy_of"] == "model.transformer.wte.weight"
    assert (
        rel_err(run_plain(tmp_path / "out" / "merged.onnx", feeds_of(inputs))[0], output_of(peft_model, inputs)) <= 1e-5
    )

"""VeRA against PEFT's VeraModel (the independent reference): layers, files both ways, merge and inject in ONNX."""

from __future__ import annotations

import copy
import json
import os
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_rel_close, output_of
from inject_fixtures import export_base
from models import tiny_bert, tiny_gpt2, tiny_llama

from lora_export import AdapterError, LoraSession, attach_lora, load_adapter, merge_lora, save_adapter
from lora_export.cli import cli
from lora_export.core.vera import VeraConfig, generate_projection
from lora_export.formats.safetensors import read_safetensors
from lora_export.training.attach import lora_layers

MODELS = {
    # BERT's pooler is not in a last_hidden_state export: "dense" would need --base-weights there.
    "bert": (tiny_bert, ["query", "value", "intermediate.dense", "output.dense"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),  # HF Conv1D: fan_in_fan_out
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),  # layers of different in/out sizes
}
R = 4


def peft_vera(base, targets, key=3, seed=1, save_projection=True):
    """PEFT's VeRA model on a copy of ``base`` with random (nonzero) λ_d and λ_b."""
    from peft import VeraConfig as PeftVeraConfig
    from peft import get_peft_model

    cfg = PeftVeraConfig(r=R, target_modules=targets, projection_prng_key=key, save_projection=save_projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def peft_save(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
    return path


def cli_ok(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", MODELS)
def test_layers_match_peft_and_files_go_both_ways(arch, tmp_path):
    build, targets = MODELS[arch]
    base, make_inputs = build()
    ref = peft_vera(base, targets)
    ours = attach_lora(
        copy.deepcopy(base), VeraConfig(r=R, target_modules=targets, projection_prng_key=3), verbose=False
    )
    inner = ref.base_model.model
    with torch.no_grad():
        for path, layer in lora_layers(ours).items():
            layer.vera_lambda_d.copy_(inner.get_submodule(path).vera_lambda_d["default"])
            layer.vera_lambda_b.copy_(inner.get_submodule(path).vera_lambda_b["default"])
    # Our generated projections are PEFT's, bit for bit.
    shared = next(iter(lora_layers(ours).values())).vera_shared
    assert torch.equal(shared.A, ref.base_model.vera_A["default"]) and torch.equal(
        shared.B, ref.base_model.vera_B["default"]
    )
    x = make_inputs(11)
    expected = output_of(ref, x)
    assert (output_of(base, x) - expected).abs().max() > 1e-3
    assert_rel_close(output_of(ours.eval(), x), expected)
    # Only the λ vectors train.
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("vera_lambda_d", "vera_lambda_b")) for n in trainable)

    # PEFT-saved → ours, with and without stored projections.
    for sp in (True, False):
        saved = peft_save(peft_vera(base, targets, save_projection=sp), tmp_path / f"peft-{sp}")
        loaded = attach_lora(copy.deepcopy(base), load_adapter(saved), verbose=False).eval()
        assert_rel_close(output_of(loaded, x), expected)
    # Ours-saved → PEFT loads it, with and without projections.
    from peft import PeftModel

    for sp in (True, False):
        ours.__dict__["_lora_export_config"] = VeraConfig(
            r=R, target_modules=targets, projection_prng_key=3, save_projection=sp
        )
        out = save_adapter(ours, tmp_path / f"ours-{sp}")
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is sp
        keys = set(read_safetensors(out / "adapter_model.safetensors")[0])
        assert ("base_model.vera_A" in keys) is sp
        assert all(k.endswith(("vera_lambda_d", "vera_lambda_b")) or k.startswith("base_model.vera_") for k in keys)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
        assert_rel_close(output_of(back, x), expected)
    # In-PyTorch merge (LoRA's code, VeRA's A′/B′) keeps the outputs.
    merge_lora(ours)
    assert_rel_close(output_of(ours, x), expected)


def test_regenerated_projections_are_peft_buffers():
    base, _ = tiny_llama()
    ref = peft_vera(base, ["q_proj", "down_proj"], key=12345, save_projection=False)
    p = generate_projection(12345, R, 64, 32)
    assert np.array_equal(p.A, ref.base_model.vera_A["default"].numpy())
    assert np.array_equal(p.B, ref.base_model.vera_B["default"].numpy())


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    """A base ONNX export and two PEFT VeRA adapters on it (same key), with PEFT's unmerged outputs."""
    arch = request.param
    build, targets = MODELS[arch]
    d = tmp_path_factory.mktemp(f"vera-{arch}")
    base, make_inputs = build()
    refs = {name: peft_vera(base, targets, seed=seed) for name, seed in (("one", 1), ("two", 2))}
    for name, ref in refs.items():
        peft_save(ref, d / name)
    export_base(base, make_inputs(0), d / "base.onnx")
    x = make_inputs(23)  # fresh inputs, not the export's
    feeds = {k: v.numpy() for k, v in x.items()}
    want = {name: output_of(ref, x).numpy() for name, ref in refs.items()}
    return arch, d, base, targets, feeds, want, output_of(base, x).numpy()


def test_merge_and_inject_equal_peft(exported):
    arch, d, base, targets, feeds, want, base_out = exported
    cli_ok("merge", d / "base.onnx", d / "one", "-o", d / "merged.onnx")
    merged = ort.InferenceSession(str(d / "merged.onnx")).run(None, feeds)[0]
    assert rel(merged, want["one"]) <= 1e-5

    cli_ok("inject", d / "base.onnx", d / "one", d / "two", "-o", d / "served")
    slots = json.loads(_meta(d / "served" / "model.onnx")["lora_export.slots"])
    assert slots["vera"]["key"] == 3 and slots["vera"]["r"] == R
    # The shared projections are in the graph once.
    import onnx

    model = onnx.load(str(d / "served" / "model.onnx"))
    inits = {i.name for i in model.graph.initializer}
    assert {"lora_export.vera_A", "lora_export.vera_B"} <= inits
    assert not any("vera_A" in n for n in inits - {"lora_export.vera_A"})

    sess = LoraSession(d / "served" / "model.onnx")
    for name in ("one", "two"):
        # The adapter file holds only λ vectors: r + out floats per layer.
        tensors = read_safetensors(d / "served" / f"{name}.safetensors")[0]
        assert tensors and all(k.endswith((".vera_lambda_d", ".vera_lambda_b")) for k in tensors)
        assert all(v.shape == (R,) for k, v in tensors.items() if k.endswith("_d")) and len(tensors) >= 8
        assert all(v.ndim == 1 and v.dtype == np.float32 for v in tensors.values())
        assert os.path.getsize(d / "served" / f"{name}.onnx_adapter") < 8 * 1024
        sess.load_adapter(name, d / "served" / f"{name}.onnx_adapter")
        assert rel(sess.run(None, feeds, adapter=name)[0], want[name]) <= 1e-5
    # No adapter: the base model, exactly.
    assert np.array_equal(sess.run(None, feeds)[0], ort.InferenceSession(str(d / "base.onnx")).run(None, feeds)[0])
    # Plain ONNX Runtime with the .onnx_adapter file.
    plain = ort.InferenceSession(str(d / "served" / "model.onnx"))
    adapter = ort.LoraAdapter()
    adapter.Load(str(d / "served" / "two.onnx_adapter"))
    opts = ort.RunOptions()
    opts.add_active_adapter(adapter)
    assert rel(plain.run(None, feeds, opts)[0], want["two"]) <= 1e-5


def test_convert_refuses_other_projections_and_plain_lora(exported, tmp_path):
    arch, d, base, targets, feeds, want, _ = exported
    served = tmp_path / "served"
    cli_ok("inject", d / "base.onnx", d / "one", "-o", served)
    # A later adapter over the same projections converts to a vector file and serves exactly.
    cli_ok("convert", d / "two", "--model", served / "model.onnx", "-o", served / "two.onnx_adapter")
    sess = LoraSession(served / "model.onnx")
    sess.load_adapter("two", served / "two.onnx_adapter")
    assert rel(sess.run(None, feeds, adapter="two")[0], want["two"]) <= 1e-5
    # Another projection key: refused by name, one line, nothing written.
    other = peft_save(peft_vera(base, targets, key=4), tmp_path / "other")
    res = CliRunner().invoke(
        cli, ["convert", str(other), "--model", str(served / "model.onnx"), "-o", str(tmp_path / "o.onnx_adapter")]
    )
    assert res.exit_code == 2 and "projection_prng_key 4" in res.output and "'other'" in res.output
    assert not (tmp_path / "o.onnx_adapter").exists()
    with pytest.raises(AdapterError, match="projection_prng_key 4"):
        sess.load_adapter("other", other)
    # A plain LoRA adapter on a VeRA-injected model: refused.
    from conftest import saved_peft_reference

    saved_peft_reference(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=targets)
    with pytest.raises(AdapterError, match="plain LoRA"):
        sess.load_adapter("lora", tmp_path / "lora")


def test_projectionless_adapter_merges_and_mixed_inject_uses_lora_slots(tmp_path):
    build, targets = MODELS["gpt2"]
    base, make_inputs = build()
    ref = peft_vera(base, targets, key=9, save_projection=False)
    peft_save(ref, tmp_path / "nop")
    export_base(base, make_inputs(0), tmp_path / "base.onnx")
    x = make_inputs(31)
    feeds = {k: v.numpy() for k, v in x.items()}
    want = output_of(ref, x).numpy()
    # Sizes come from the graph; the projections are regenerated from the key, as PEFT does.
    cli_ok("merge", tmp_path / "base.onnx", tmp_path / "nop", "-o", tmp_path / "m.onnx")
    assert rel(ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, feeds)[0], want) <= 1e-5
    # VeRA beside an adapter over other projections: plain LoRA slots (A′, B′), still exact.
    peft_save(peft_vera(base, targets, key=10), tmp_path / "k10")
    cli_ok("inject", tmp_path / "base.onnx", tmp_path / "nop", tmp_path / "k10", "-o", tmp_path / "served")
    sess = LoraSession(tmp_path / "served" / "model.onnx")
    assert sess.manifest.vera is None
    sess.load_adapter("nop", tmp_path / "served" / "nop.onnx_adapter")
    assert rel(sess.run(None, feeds, adapter="nop")[0], want) <= 1e-5


def _meta(path):
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}

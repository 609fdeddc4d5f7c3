"""Adapter mode: injected model + adapter X equals PEFT with X; no adapter equals the base model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from inject_fixtures import conv_case_fixture, gpt2_case_fixture, llama_case_fixture, rel_err  # noqa: F401

from lora_export.cli import cli
from lora_export.formats.adapter_files import read_adapter_tensors
from lora_export.graph.model.slot_manifest import SLOTS_KEY

TOL = 1e-5


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _native(sess: ort.InferenceSession, feeds: dict, adapter_file) -> np.ndarray:
    """ONNX Runtime's own multi-LoRA path: LoraAdapter + RunOptions.add_active_adapter."""
    ad = ort.LoraAdapter()
    ad.Load(str(adapter_file))
    ro = ort.RunOptions()
    ro.add_active_adapter(ad)
    return sess.run(None, feeds, ro)[0]


def _check_case(case, names) -> None:
    sess = _session(case.model)
    assert rel_err(sess.run(None, case.feeds)[0], case.base_ref) <= TOL
    for name in names:
        assert rel_err(case.refs[name], case.base_ref) > 1e-3, "vacuous: the adapter changes nothing"
        out = _native(sess, case.feeds, case.out_dir / f"{name}.onnx_adapter")
        assert rel_err(out, case.refs[name]) <= TOL, name
        # The .safetensors holds the same tensors, fed as plain inputs.
        tensors = read_adapter_tensors(case.out_dir / f"{name}.safetensors")
        assert rel_err(sess.run(None, {**case.feeds, **tensors})[0], case.refs[name]) <= TOL, name


def test_llama_two_ranks_and_dora_match_peft(llama_case):
    _check_case(llama_case, ["a_r4", "b_r8", "c_dora"])


def test_gpt2_gemm_with_bias_lora_and_dora(gpt2_case):
    ops = {n.op_type for n in onnx.load(str(gpt2_case.base_onnx)).graph.node}
    assert "Gemm" in ops
    _check_case(gpt2_case, ["lora", "dora"])


def test_conv_grouped_conv_embedding_and_gemm(conv_case):
    _check_case(conv_case, ["all", "dora"])
    props = {p.key: p.value for p in onnx.load(str(conv_case.model)).metadata_props}
    slots = json.loads(props[SLOTS_KEY])["slots"]
    assert {s["op"] for s in slots} == {"Conv", "Gather", "Gemm"}


def test_slot_inputs_are_named_documented_and_optional(llama_case):
    model = onnx.load(str(llama_case.model))
    meta = {p.key: p.value for p in model.metadata_props}
    slots = json.loads(meta[SLOTS_KEY])["slots"]
    inputs = {i.name: i for i in model.graph.input}
    inits = {i.name: i for i in model.graph.initializer}
    q = "model.layers.0.self_attn.q_proj"
    assert {f"{q}.lora_A", f"{q}.lora_B", f"{q}.dora_scale"} <= set(inputs)
    o = "model.layers.1.self_attn.o_proj"
    assert f"{o}.lora_A" in inputs and f"{o}.dora_scale" not in inputs  # no DoRA adapter targets o_proj
    dims = inputs[f"{q}.lora_A"].type.tensor_type.shape.dim
    assert dims[1].dim_param == f"{q}.rank"
    assert list(inits[f"{q}.lora_A"].dims) == [32, 0]  # rank-0 default: the base model
    assert len(slots) == 6


def test_adapter_files_hold_scaled_b(llama_case):
    # rank 8, rsLoRA: scale = 16/sqrt(8); B' = scale·Bᵀ.
    from lora_export.formats.peft import load_adapter

    adapter = load_adapter(llama_case.adapters["b_r8"])
    t = adapter.targets["model.layers.0.self_attn.q_proj"]
    tensors = read_adapter_tensors(llama_case.out_dir / "b_r8.onnx_adapter")
    assert t.scale == pytest.approx(16 / np.sqrt(8))
    np.testing.assert_allclose(tensors[f"{t.name}.lora_B"], (t.B * t.scale).T, rtol=1e-6)
    np.testing.assert_array_equal(tensors[f"{t.name}.lora_A"], t.A.T)


def test_cli_is_deterministic_and_refuses_misfits(llama_case, gpt2_case, tmp_path):
    runner = CliRunner()
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        res = runner.invoke(
            cli,
            ["inject", str(llama_case.base_onnx), str(llama_case.adapters["a_r4"]), "-o", str(out), "--json"],
        )
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["slots"]
        outs.append(out)
    for f in ("model.onnx", "a_r4.onnx_adapter", "a_r4.safetensors"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    # An adapter for another model: refused in one line, nothing written.
    bad = tmp_path / "bad"
    res = runner.invoke(cli, ["inject", str(llama_case.base_onnx), str(gpt2_case.adapters["lora"]), "-o", str(bad)])
    assert res.exit_code == 2
    assert "c_attn" in res.output and len(res.output.strip().splitlines()) == 1
    assert not bad.exists()


def test_external_data_is_kept(llama_case, tmp_path):
    from lora_export.graph.model.model_io import load_model, save_model
    from lora_export.graph.verbs.inject import inject_files

    base = tmp_path / "ext" / "base.onnx"
    save_model(load_model(llama_case.base_onnx), base, external=True)
    out = tmp_path / "out"
    inject_files(base, [llama_case.adapters["a_r4"]], out)
    assert len(list(out.glob("model.onnx.*.data"))) == 1
    sess = _session(out / "model.onnx")
    y = _native(sess, llama_case.feeds, out / "a_r4.onnx_adapter")
    assert rel_err(y, llama_case.refs["a_r4"]) <= TOL


def test_injected_equals_merged_model(llama_case, tmp_path):
    from lora_export import merge_file

    sess = _session(llama_case.model)
    for name in ("a_r4", "c_dora"):
        merged = tmp_path / f"{name}.onnx"
        merge_file(llama_case.base_onnx, llama_case.adapters[name], merged)
        expected = _session(merged).run(None, llama_case.feeds)[0]
        assert rel_err(_native(sess, llama_case.feeds, llama_case.out_dir / f"{name}.onnx_adapter"), expected) <= TOL


def test_float16_model_gets_float16_slots(tmp_path):
    # A′, B′ and g are folded in float32 and cast once to the model's dtype.
    import torch
    from conftest import peft_reference
    from inject_fixtures import export_base

    from lora_export.graph.verbs.inject import inject_files

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.fc = torch.nn.Linear(16, 16)
            self.out = torch.nn.Linear(16, 8)

        def forward(self, ids):
            return self.out(torch.relu(self.fc(self.emb(ids))))

    torch.manual_seed(0)
    net = Net().eval()
    ids = torch.randint(0, 50, (2, 5))
    peft_model = peft_reference(net, seed=3, r=4, lora_alpha=8, target_modules=["fc", "emb"], use_dora=True)
    with torch.no_grad():
        ref = peft_model(ids).numpy()
    peft_model.save_pretrained(str(tmp_path / "ad"))
    export_base(net.half(), {"ids": ids}, tmp_path / "base.onnx")
    result = inject_files(tmp_path / "base.onnx", [tmp_path / "ad"], tmp_path / "out")
    assert {s.dtype for s in result.manifest.slots.values()} == {"float16"}
    tensors = read_adapter_tensors(tmp_path / "out" / "ad.onnx_adapter")
    assert {v.dtype for v in tensors.values()} == {np.dtype(np.float16)}
    y = _native(_session(tmp_path / "out" / "model.onnx"), {"ids": ids.numpy()}, tmp_path / "out" / "ad.onnx_adapter")
    assert y.dtype == np.float16 and rel_err(y.astype(np.float32), ref) <= 2e-3

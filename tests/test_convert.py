"""convert: a later adapter for an already-injected model; misfits refused by name."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from inject_fixtures import conv_case_fixture, llama_case_fixture, rel_err  # noqa: F401

from lora_export import LoraSession, ShapeError, TargetError, convert_adapter
from lora_export.cli import cli
from lora_export.formats.peft import load_adapter

TOL = 1e-5


def _native(model, feeds, adapter_file) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    ad = ort.LoraAdapter()
    ad.Load(str(adapter_file))
    ro = ort.RunOptions()
    ro.add_active_adapter(ad)
    return sess.run(None, feeds, ro)[0]


def test_convert_cli_later_subset_adapter(llama_case, tmp_path):
    # d_late (rank 2, q_proj only) was never injected: it fills a subset of the slots.
    out = tmp_path / "late.onnx_adapter"
    res = CliRunner().invoke(
        cli, ["convert", str(llama_case.adapters["d_late"]), "--model", str(llama_case.model), "-o", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert len(report["slots_filled"]) == 2 and len(report["slots_default"]) == 4
    assert rel_err(_native(llama_case.model, llama_case.feeds, out), llama_case.refs["d_late"]) <= TOL


def test_convert_dora_reads_base_weights_from_the_model(llama_case, tmp_path):
    out = tmp_path / "dora.safetensors"
    convert_adapter(llama_case.adapters["c_dora"], llama_case.model, out)
    sess = LoraSession(llama_case.model, providers=["CPUExecutionProvider"])
    sess.load_adapter("dora", out)
    assert rel_err(sess.run(None, llama_case.feeds, adapter="dora")[0], llama_case.refs["c_dora"]) <= TOL


def test_convert_conv_model(conv_case, tmp_path):
    out = tmp_path / "all.onnx_adapter"
    convert_adapter(conv_case.adapters["all"], conv_case.model, out)
    assert out.read_bytes() == (conv_case.out_dir / "all.onnx_adapter").read_bytes()


def test_convert_refuses_misfits(llama_case, tmp_path):
    out = tmp_path / "x.onnx_adapter"
    with pytest.raises(TargetError, match="k_proj"):
        convert_adapter(llama_case.adapters["e_noslot"], llama_case.model, out)
    # A rank-4 adapter trained on a wider model: every shape misfit is named.
    adapter = load_adapter(llama_case.adapters["a_r4"])
    wide = {
        k: dataclasses.replace(t, A=np.zeros((4, 48), np.float32)) if k.endswith("q_proj") else t
        for k, t in adapter.targets.items()
    }
    with pytest.raises(ShapeError) as info:
        convert_adapter(dataclasses.replace(adapter, targets=wide), llama_case.model, out)
    msg = str(info.value)
    assert "layers.0.self_attn.q_proj" in msg and "layers.1.self_attn.q_proj" in msg and "\n" not in msg
    # DoRA into a slot without a dora_scale input (o_proj was injected for a plain LoRA adapter).
    dora = load_adapter(llama_case.adapters["c_dora"])
    t = dora.targets["model.layers.0.self_attn.q_proj"]
    o_proj = dataclasses.replace(t, name="model.layers.0.self_attn.o_proj")
    bad = dataclasses.replace(dora, targets={o_proj.name: o_proj})
    with pytest.raises(ShapeError, match="dora_scale"):
        convert_adapter(bad, llama_case.model, out)
    assert not out.exists()
    # CLI: one line, exit code 2.
    res = CliRunner().invoke(
        cli, ["convert", str(llama_case.adapters["e_noslot"]), "--model", str(llama_case.model), "-o", str(out)]
    )
    assert res.exit_code == 2 and res.output.startswith("error:") and len(res.output.strip().splitlines()) == 1


def test_inject_dora_reserves_scale_inputs_for_later_dora_adapters(llama_case, tmp_path):
    # Injected from plain-LoRA adapters only, but with --dora: a DoRA adapter converted later fits,
    # and the plain adapters still run unchanged through the (default ones) scale inputs.
    plain = [llama_case.adapters[n] for n in ("a_r4", "b_r8")]
    out_dir = tmp_path / "served"
    res = CliRunner().invoke(cli, ["inject", str(llama_case.base_onnx), *map(str, plain), "-o", str(out_dir), "--dora"])
    assert res.exit_code == 0, res.output
    later = tmp_path / "dora.onnx_adapter"
    res = CliRunner().invoke(
        cli, ["convert", str(llama_case.adapters["c_dora"]), "--model", str(out_dir / "model.onnx"), "-o", str(later)]
    )
    assert res.exit_code == 0, res.output
    model = out_dir / "model.onnx"
    assert rel_err(_native(model, llama_case.feeds, later), llama_case.refs["c_dora"]) <= TOL
    assert rel_err(_native(model, llama_case.feeds, out_dir / "a_r4.onnx_adapter"), llama_case.refs["a_r4"]) <= TOL

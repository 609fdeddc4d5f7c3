"""The FusedMatMul plugin on a graph ONNX Runtime itself wrote: a LLaMA whose linears are
MatMul(x, Transpose(W)) (W stored (out, in), as some exporters keep it), saved by ORT at the extended
optimization level without constant folding, which fuses each into ``FusedMatMul(transB=1)``. merge and
inject equal PEFT; the attention's scaled FusedMatMul (alpha ≠ 1, no weight) is never taken for a target."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, saved_peft_reference
from models import tiny_llama
from onnx_fixtures import export_onnx, run_onnx

from lora_export.cli import cli

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def plugin():
    from lora_export_plugins import fused_matmul

    fused_matmul.register()


def _untranspose(src: Path, out: Path) -> None:
    """Store every MatMul weight (in, out) as W (out, in) behind a Transpose node."""
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is not None and len(w.dims) == 2:
            arr = onnx.numpy_helper.to_array(w)
            w.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(arr.T), w.name))
            nodes.append(onnx.helper.make_node("Transpose", [w.name], [w.name + "_t"], name=node.name + "/T"))
            node.input[1] = w.name + "_t"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    base, make_inputs = tiny_llama()
    plain = export_onnx(base, make_inputs(0), root / "plain.onnx", dynamo=False)
    _untranspose(plain, root / "transposed.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(root / "fused.onnx")
    # Without constant folding ORT keeps W (out, in) and fuses the Transpose into the product.
    ort.InferenceSession(
        str(root / "transposed.onnx"), so, providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantFolding"]
    )
    ops = Counter(n.op_type for n in onnx.load(str(root / "fused.onnx")).graph.node)
    assert ops["FusedMatMul"] == 2 * 7 + 1 + 2  # every linear fused (+ two Q·Kᵀ), so the test bites
    return base, make_inputs, root / "fused.onnx", root


def _rel(a: np.ndarray, b: torch.Tensor) -> float:
    ref = b.detach().numpy()
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_merge_and_inject_equal_peft(fused):
    base, make_inputs, path, root = fused
    peft_model = saved_peft_reference(base, root / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    inputs = make_inputs(7)
    expected = output_of(peft_model, inputs)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    assert _rel(run_onnx(path, inputs), output_of(base, inputs)) < 1e-5  # the fused file is the base

    runner = CliRunner()
    res = runner.invoke(cli, ["merge", str(path), str(root / "adapter"), "-o", str(root / "merged.onnx"), "--json"])
    assert res.exit_code == 0, res.output
    assert _rel(run_onnx(root / "merged.onnx", inputs), expected) < 1e-5
    ops = Counter(n.op_type for n in onnx.load(str(root / "merged.onnx")).graph.node)
    assert ops == Counter(n.op_type for n in onnx.load(str(path)).graph.node)  # nodes unchanged

    res = runner.invoke(cli, ["inject", str(path), f"a={root / 'adapter'}", "-o", str(root / "served")])
    assert res.exit_code == 0, res.output
    sess = ort.InferenceSession(str(root / "served" / "model.onnx"), providers=["CPUExecutionProvider"])
    adapter = ort.LoraAdapter()
    adapter.Load(str(root / "served" / "a.onnx_adapter"))
    opts = ort.RunOptions()
    opts.add_active_adapter(adapter)
    assert _rel(sess.run(None, feeds, opts)[0], expected) < 1e-5
    assert _rel(sess.run(None, feeds)[0], output_of(base, inputs)) < 1e-5


def test_scaled_fused_matmul_is_not_a_weight(fused):
    from lora_export.graph.model.model_io import load_model
    from lora_export.graph.ops.layouts import get_layout

    *_, path, _ = fused
    model = load_model(path)
    fused = [n for n in model.graph if n.op_type == "FusedMatMul"]
    scaled = [n for n in fused if n.attributes["alpha"].as_float() != 1.0]
    plain = [n for n in fused if n.attributes["alpha"].as_float() == 1.0]
    assert len(plain) == 2 * 7 + 1 and len(scaled) == 2
    assert all(get_layout(n).weight_shape(n) is not None for n in plain)
    for node in scaled:  # the attention's Q·Kᵀ·(1/√d): no initializer, and alpha ≠ 1
        assert get_layout(node).weight_value(node) is None

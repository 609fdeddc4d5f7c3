"""Small hand-built ONNX models and adapters for the robustness and fuzz tests (no torch export: fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_export import Adapter, LoraConfig, LoraTarget, save_adapter_files

IN, OUT, VOCAB = 4, 6, 10


def tiny_model() -> onnx.ModelProto:
    """ids → Gather(emb) → Gemm(fc, transB=1) → MatMul(proj): three targetable weights, inline."""
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((VOCAB, IN)).astype(np.float32), "emb.weight")
    fc = numpy_helper.from_array(rng.standard_normal((OUT, IN)).astype(np.float32), "fc.weight")
    fc_b = numpy_helper.from_array(np.zeros(OUT, np.float32), "fc.bias")
    proj = numpy_helper.from_array(rng.standard_normal((OUT, IN)).astype(np.float32), "proj.weight")
    nodes = [
        helper.make_node("Gather", ["emb.weight", "ids"], ["h0"], name="/emb/Gather"),
        helper.make_node("Gemm", ["h0", "fc.weight", "fc.bias"], ["h1"], name="/fc/Gemm", transB=1),
        helper.make_node("MatMul", ["h1", "proj.weight"], ["y"], name="/proj/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, IN])],
        [emb, fc, fc_b, proj],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_model(path: Path, proto: onnx.ModelProto | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((proto or tiny_model()).SerializeToString())
    return path


def write_adapter(directory: Path, b_value: float = 0.1, **config) -> Path:
    """A PEFT adapter on ``fc`` (linear, out=OUT, in=IN) and ``emb`` (embedding)."""
    rng = np.random.default_rng(1)
    fc = LoraTarget(
        "fc", "linear", rng.standard_normal((2, IN)).astype(np.float32), np.full((OUT, 2), b_value, np.float32), 1.0
    )
    emb = LoraTarget(
        "emb",
        "embedding",
        rng.standard_normal((2, VOCAB)).astype(np.float32),
        np.full((IN, 2), b_value, np.float32),
        1.0,
    )
    cfg = LoraConfig(**{"r": 2, "lora_alpha": 2, "target_modules": ["fc", "emb"], **config})
    save_adapter_files(Adapter({"fc": fc, "emb": emb}, cfg), directory)
    return directory


def conv_model() -> onnx.ModelProto:
    """x → Conv(conv, 3x3) → Flatten → MatMul(Transpose(lin)): a conv and a transposed linear weight."""
    rng = np.random.default_rng(2)
    conv = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "conv.weight")
    lin = numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "lin.weight")
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="/conv/Conv", group=1),
        helper.make_node("Flatten", ["c"], ["f"], name="/Flatten"),
        helper.make_node("Transpose", ["lin.weight"], ["lin_t"], name="/lin/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["f", "lin_t"], ["y"], name="/lin/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [conv, lin],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def write_conv_adapter(directory: Path) -> Path:
    """A PEFT adapter on ``conv`` (2 out, 1 in, 3x3) and ``lin`` (3 out, 8 in)."""
    rng = np.random.default_rng(3)
    conv = LoraTarget(
        "conv",
        "conv",
        rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
        np.full((2, 2, 1, 1), 0.1, np.float32),
        1.0,
    )
    lin = LoraTarget(
        "lin", "linear", rng.standard_normal((2, 8)).astype(np.float32), np.full((3, 2), 0.1, np.float32), 1.0
    )
    save_adapter_files(Adapter({"conv": conv, "lin": lin}, LoraConfig(r=2, target_modules=["conv", "lin"])), directory)
    return directory

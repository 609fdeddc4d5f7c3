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

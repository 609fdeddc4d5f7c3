"""Model I/O edges: external data chosen automatically past the protobuf limit, atomic saves."""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lora_export import ModelError
from lora_export.graph.model import model_io as onnx_model
from lora_export.graph.model.model_io import load_model, save_model


def _matmul_model(rng: np.random.Generator) -> ir.Model:
    w = rng.standard_normal((16, 8)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 16]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    node = ir.node("MatMul", [x, wv], name="mm")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[wv], opset_imports={"": 17})
    return ir.Model(graph, ir_version=9)


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_external_data_chosen_past_the_inline_limit(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    save_model(_matmul_model(rng), tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()
    want = _run(tmp_path / "inline.onnx", x)

    # Pretend the weights would not fit in one protobuf (the real limit is ~2 GB).
    monkeypatch.setattr(onnx_model, "INLINE_LIMIT_BYTES", 100)
    written = save_model(load_model(tmp_path / "inline.onnx"), tmp_path / "big.onnx")
    data = written[0].name  # named by its content: a model and its data replace an older pair as one unit
    assert [p.name for p in written] == [data, "big.onnx"] and re.fullmatch(r"big\.onnx\.[0-9a-f]{16}\.data", data)
    assert (tmp_path / data).stat().st_size >= 16 * 8 * 4
    np.testing.assert_array_equal(_run(tmp_path / "big.onnx", x), want)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = _matmul_model(np.random.default_rng(4))

    def broken_save(m, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(ModelError, match="No space left"):
        save_model(model, tmp_path / "out.onnx", external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

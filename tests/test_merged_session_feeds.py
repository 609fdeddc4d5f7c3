"""``MergedSession`` on the CPU feeds a weight read as a MatMul/Gemm B transposed (FusedMatMul/Gemm with
``transB=1``: MLAS packs a transposed B at half the cost); the weights stay bit for bit merge's, the outputs
those of merge's file, whatever layout reads them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lora_export import Adapter, LoraConfig, LoraTarget, MergedSession, merge_adapter
from lora_export.runtime.fast_fold import Transposer
from lora_export.runtime.session_proto import session_model


def _model(rng) -> tuple[ir.Model, Adapter]:
    """x → MatMul(Wqᵀ) → Gemm(Wvᵀ, transB=0) → Gemm(Wo, transB=1) → MatMul(Wa, ·) (the weight as A)."""
    w = {
        "q.weight": rng.standard_normal((16, 12)),
        "v.weight": rng.standard_normal((12, 10)),
        "o.weight": rng.standard_normal((6, 10)),
        "a.weight": rng.standard_normal((4, 5)),
    }
    inits = {k: ir.Value(name=k, const_value=ir.tensor(v.astype(np.float32), name=k)) for k, v in w.items()}
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([5, 16]))
    q = ir.node("MatMul", [x, inits["q.weight"]], name="/q/MatMul")
    v = ir.node("Gemm", [q.outputs[0], inits["v.weight"]], attributes={"transB": 0}, name="/v/Gemm")
    o = ir.node("Gemm", [v.outputs[0], inits["o.weight"]], attributes={"transB": 1}, name="/o/Gemm")
    a = ir.node("MatMul", [inits["a.weight"], o.outputs[0]], name="/a/MatMul")
    a.outputs[0].name = "y"
    graph = ir.Graph([x], a.outputs, nodes=[q, v, o, a], initializers=list(inits.values()), opset_imports={"": 17})

    def rand(*s):
        return rng.standard_normal(s).astype(np.float32)

    targets = {
        "q": LoraTarget("q", "linear", A=rand(4, 16), B=rand(12, 4), scale=0.5),
        "v": LoraTarget("v", "linear", A=rand(4, 12), B=rand(10, 4), scale=0.5),
        "o": LoraTarget("o", "linear", A=rand(4, 10), B=rand(6, 4), scale=0.5),
    }
    config = LoraConfig(r=4, lora_alpha=2.0)
    return ir.Model(graph, ir_version=9), Adapter(targets=targets, config=config, name="t")


def test_b_weights_are_read_transposed_and_a_weights_are_not(tmp_path):
    model, _ = _model(np.random.default_rng(3))
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    owned = {"q.weight", "v.weight", "o.weight", "a.weight"}
    proto, flipped = session_model(path, owned, ort.SessionOptions(), external=False, transpose=True)
    # Gemm transB=1 reads W already; a weight read as A is left as it is.
    assert flipped == {"q.weight", "v.weight"}
    assert session_model(path, owned, ort.SessionOptions(), external=False)[1] == set()
    sess = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes["q.weight"] == [12, 16] and shapes["v.weight"] == [10, 12] and shapes["o.weight"] == [6, 10]
    rng = np.random.default_rng(4)
    feeds = {"x": rng.standard_normal((5, 16)).astype(np.float32)}
    weights = {n: model.graph.initializers[n].const_value.numpy() for n in owned}
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    fed = {n: np.ascontiguousarray(w.T) if n in flipped else w for n, w in weights.items()}
    out = sess.run(None, {**feeds, **fed})[0]
    assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize(
    ("providers", "transpose", "flipped"),
    [
        ([("CPUExecutionProvider", {})], True, {"q.weight", "v.weight"}),
        (["CPUExecutionProvider"], False, set()),
    ],
)
def test_transposed_feeds_hold_merges_weights(tmp_path, providers, transpose, flipped):
    rng = np.random.default_rng(5)
    model, adapter = _model(rng)
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    sess = MergedSession(path, providers=providers, adapters={"t": adapter}, transpose_feeds=transpose)
    assert sess._flipped == flipped  # the mechanism under test is the one in use
    base_w = {n: sess.weight(n) for n in sess.targeted_initializers}
    merge_adapter(model, adapter)
    ir.save(model, tmp_path / "merged.onnx")
    feeds = {"x": rng.standard_normal((5, 16)).astype(np.float32)}
    ref = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    base_ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for _ in range(3):
        sess.switch("t")
        for name in sess.targeted_initializers:
            want = model.graph.initializers[name].const_value.numpy()
            got = sess.weight(name)
            assert got.shape == want.shape and got.tobytes() == want.tobytes(), name
        out = sess.run(None, feeds)[0]
        assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()
        sess.switch(None)
        assert all(sess.weight(n).tobytes() == w.tobytes() for n, w in base_w.items())
        base_out = sess.run(None, feeds)[0]
        assert np.abs(base_out - base_ref).max() <= 1e-6 * np.abs(base_ref).max()


@pytest.mark.parametrize("shape", [(128, 192), (192, 128), (130, 64), (1, 7)])
def test_transposer_writes_the_exact_transpose(shape):
    """Sides that are multiples of 64 (over 64) go through the tiled 4-D transpose; others the plain one."""
    src = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    dst = np.zeros(shape[::-1], np.float32)
    Transposer()(src, ort.OrtValue.ortvalue_from_numpy(dst))
    assert np.array_equal(dst, src.T)

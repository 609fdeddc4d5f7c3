"""MergedSession: a plain base model served with merged weights, adapters switched in place.

References: ``lora-export merge``'s file (weights bit for bit, outputs through plain ONNX Runtime), PEFT's own
outputs, and the plain base session for ``switch(None)``.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from inject_fixtures import llama_case_fixture, rel_err  # noqa: F401

from lora_export import Adapter, LoraConfig, LoraExportError, LoraTarget, MergedSession, merge_adapter, merge_file
from lora_export.formats.adapter_files import write_adapter_tensors

NAMES = ["a_r4", "b_r8", "c_dora"]
PEFT_TOL = 1e-5  # PyTorch vs ONNX Runtime kernels; the weights themselves are compared bit for bit


@pytest.fixture(scope="module")
def ext_base(llama_case, tmp_path_factory):
    """The base with its weights in an external data file (as large models are), and merge's file per adapter."""
    root = tmp_path_factory.mktemp("merged_session")
    proto = onnx.load(str(llama_case.base_onnx))
    base = root / "base.onnx"
    onnx.save_model(proto, str(base), save_as_external_data=True, location="base.onnx.data", size_threshold=0)
    merged = {n: root / f"merged_{n}.onnx" for n in NAMES}
    for n in NAMES:
        merge_file(base, llama_case.adapters[n], merged[n])
    return base, merged


@pytest.fixture(scope="module")
def served(llama_case, ext_base):
    base, _ = ext_base
    return MergedSession(base, adapters={n: llama_case.adapters[n] for n in NAMES})


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _plain(path, feeds) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_switch_gives_merges_weights_and_outputs(served, llama_case, ext_base):
    base, merged = ext_base
    assert served.active is None and served.adapters == NAMES
    assert len(served.targeted_initializers) == 6  # q/v/o of two layers, nothing else
    base_weights = _initializers(base)
    for n in ["b_r8", "a_r4", "c_dora", "a_r4"]:
        served.switch(n)
        assert served.active == n
        want = _initializers(merged[n])
        for name in served.targeted_initializers:
            got = served.weight(name)
            assert got.dtype == want[name].dtype and np.array_equal(got.view(np.uint32), want[name].view(np.uint32))
        changed = [k for k in want if not np.array_equal(want[k], base_weights[k])]
        assert changed and set(changed) <= set(served.targeted_initializers)
        out = served.run(None, llama_case.feeds)[0]
        ref = _plain(merged[n], llama_case.feeds)
        assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()
        assert rel_err(out, llama_case.refs[n]) <= PEFT_TOL  # PEFT's own output
    served.switch(None)
    assert served.active is None
    assert np.array_equal(served.run(["output"], llama_case.feeds)[0], _plain(base, llama_case.feeds))
    assert rel_err(served.run(None, llama_case.feeds)[0], llama_case.base_ref) <= PEFT_TOL


def test_a_thousand_cycles_do_not_drift(served, llama_case):
    rng = np.random.default_rng(5)
    feeds = llama_case.make_inputs(int(rng.integers(1000, 2000)))
    feeds = {k: v.numpy() for k, v in feeds.items()}
    served.switch("a_r4")
    first = served.run(None, feeds)[0]
    weights = {n: served.weight(n) for n in served.targeted_initializers}
    for i in range(1000):
        served.switch("a_r4")
        if i % 250 == 0:
            assert np.array_equal(served.run(None, feeds)[0], first)
        served.switch("b_r8")
        served.switch(None)
    served.switch("a_r4")
    assert np.array_equal(served.run(None, feeds)[0], first)
    assert all(np.array_equal(served.weight(n), w) for n, w in weights.items())
    assert served.last_switch["adapter"] == "a_r4" and served.last_switch["timings"]["total"] > 0


def test_runs_overlapping_switches_each_see_one_adapter(served, llama_case):
    feeds = llama_case.feeds
    refs = {}
    for n in [None, "a_r4", "b_r8"]:
        served.switch(n)
        refs[n] = served.run(None, feeds)[0]
    assert all(not np.array_equal(refs[a], refs[b]) for a in refs for b in refs if a != b)
    bad, seen, stop = [], set(), threading.Event()

    def runner():
        while not stop.is_set():
            out = served.run(None, feeds)[0]
            match = [n for n, r in refs.items() if np.array_equal(out, r)]
            if len(match) != 1:
                bad.append(out)
            seen.update(match)

    threads = [threading.Thread(target=runner) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(300):
            served.switch([None, "a_r4", "b_r8"][i % 3])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad, f"{len(bad)} run(s) saw a mix of adapters"
    assert len(seen) >= 2


def test_slot_files_and_adapter_objects_serve(llama_case, ext_base, tmp_path):
    base, merged = ext_base
    sess = MergedSession(base)
    assert sess.targeted_initializers == []
    assert np.array_equal(sess.run(None, llama_case.feeds)[0], _plain(base, llama_case.feeds))
    sess.load_adapter("slots", llama_case.out_dir / "a_r4.onnx_adapter")  # written by inject (scale folded in B′)
    sess.load_adapter("st", llama_case.out_dir / "b_r8.safetensors")
    sess.switch("slots")
    assert rel_err(sess.run(None, llama_case.feeds)[0], _plain(merged["a_r4"], llama_case.feeds)) <= 1e-6
    sess.switch("st")  # more targets than "slots": the session was rebuilt with them, "slots" still served
    assert rel_err(sess.run(None, llama_case.feeds)[0], llama_case.refs["b_r8"]) <= PEFT_TOL
    sess.unload_adapter("slots")
    assert sess.adapters == ["st"]


def test_errors_are_one_line_and_leave_it_serving(served, llama_case, tmp_path):
    def refused(fn, *words):
        with pytest.raises(LoraExportError) as info:
            fn()
        msg = str(info.value)
        assert "\n" not in msg and all(w in msg for w in words), msg

    served.switch("a_r4")
    before = served.run(None, llama_case.feeds)[0]
    refused(lambda: served.switch("nope"), "nope")
    refused(lambda: served.load_adapter("a_r4", llama_case.adapters["a_r4"]), "already loaded")
    refused(lambda: served.load_adapter("x", llama_case.adapters["e_noslot"] / "nothing"), "not found")
    refused(lambda: served.unload_adapter("a_r4"), "active")
    dora_slots = tmp_path / "dora.safetensors"
    write_adapter_tensors(dora_slots, {"model.layers.0.self_attn.q_proj.dora_scale": np.ones(32, np.float32)})
    refused(lambda: served.load_adapter("x", dora_slots), "dora_scale")
    assert served.active == "a_r4" and np.array_equal(served.run(None, llama_case.feeds)[0], before)


# -- every layout; low precision rounded once, as merge rounds -----------------------------------------------


def _lowp_model(dtype, rng) -> tuple[ir.Model, Adapter]:
    """ids → Gather(table) → MatMul(Wᵀ) → Gemm(W, transB=1), every weight in ``dtype``, and an adapter on all
    three. bfloat16: the Gather alone, then a Cast (ONNX Runtime's CPU MatMul/Gemm take no bfloat16)."""
    w = {
        "emb.weight": rng.standard_normal((30, 24)),
        "q.weight": rng.standard_normal((24, 16)),
        "v.weight": rng.standard_normal((16, 16)),
    }
    inits = {k: ir.Value(name=k, const_value=ir.tensor(v.astype(dtype), name=k)) for k, v in w.items()}
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([5]))
    gather = ir.node("Gather", [inits["emb.weight"], ids], name="/emb/Gather")
    if dtype is ml_dtypes.bfloat16:
        del inits["q.weight"], inits["v.weight"]
        nodes = [gather, ir.node("Cast", [gather.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name="cast")]
    else:
        matmul = ir.node("MatMul", [gather.outputs[0], inits["q.weight"]], name="/q/MatMul")
        gemm = ir.node("Gemm", [matmul.outputs[0], inits["v.weight"]], attributes={"transB": 1}, name="/v/Gemm")
        nodes = [gather, matmul, gemm]
    nodes[-1].outputs[0].name = "y"
    graph = ir.Graph([ids], nodes[-1].outputs, nodes=nodes, initializers=list(inits.values()), opset_imports={"": 17})

    def rand(*s):
        return rng.standard_normal(s).astype(np.float32)

    dora = None if dtype is np.float32 else rand(16) + 3
    targets = {
        "emb": LoraTarget("emb", "embedding", A=rand(4, 30), B=rand(24, 4), scale=0.5),
        "q": LoraTarget("q", "linear", A=rand(4, 24), B=rand(16, 4), scale=0.5),
        # float32: plain LoRA on both linear layouts (the switch's fast path); fp16: DoRA on the Gemm.
        "v": LoraTarget("v", "linear", A=rand(4, 16), B=rand(16, 4), scale=0.5, magnitude=dora),
    }
    targets = {k: t for k, t in targets.items() if f"{k}.weight" in inits}
    return ir.Model(graph, ir_version=9), Adapter(targets=targets, config=LoraConfig(r=4, lora_alpha=2.0), name="lowp")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_weights_of_every_layout_and_dtype_are_merges(dtype, tmp_path):
    rng = np.random.default_rng(11)
    model, adapter = _lowp_model(dtype, rng)
    path = tmp_path / "lowp.onnx"
    ir.save(model, path)
    ids = rng.integers(0, 30, 5)
    sess = MergedSession(path, providers=["CPUExecutionProvider"], adapters={"a": adapter})
    merge_adapter(model, adapter)  # the in-memory merge: the same rounding, once
    for _ in range(3):
        sess.switch("a")
        for name in model.graph.initializers:
            want = model.graph.initializers[name].const_value.numpy()
            got = sess.weight(name)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
        sess.switch(None)
    ir.save(model, tmp_path / "merged.onnx")
    sess.switch("a")
    assert np.array_equal(sess.run(None, {"ids": ids})[0], _plain(tmp_path / "merged.onnx", {"ids": ids}))
    sess.switch(None)
    assert np.array_equal(sess.run(None, {"ids": ids})[0], _plain(path, {"ids": ids}))


# -- quantized targets ------------------------------------------------------------------------------------


def test_quantized_targets_refused_or_requantized(llama_case, tmp_path):
    from quant_fixtures import quantize

    q = quantize(llama_case.base_onnx, tmp_path / "q4.onnx")
    with pytest.raises(LoraExportError) as info:
        MergedSession(q, adapters={"a": llama_case.adapters["a_r4"]})
    assert "\n" not in str(info.value) and "quantized" in str(info.value)
    sess = MergedSession(q, adapters={"a": llama_case.adapters["a_r4"]}, requantize=True)
    report = sess.switch("a")
    assert set(report["requantized"]) and all(r for r in report["requantized"].values())
    merge_file(q, llama_case.adapters["a_r4"], tmp_path / "q4_merged.onnx", requantize=True)
    want = _plain(tmp_path / "q4_merged.onnx", llama_case.feeds)
    assert rel_err(sess.run(None, llama_case.feeds)[0], want) <= 1e-6

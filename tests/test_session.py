"""LoraSession: adapters loaded once, switched per call, validated, thread-safe; errors leave it serving."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import onnxruntime as ort
import pytest
from inject_fixtures import conv_case_fixture, feeds_of, gpt2_case_fixture, llama_case_fixture, rel_err  # noqa: F401

from lora_export import LoraExportError, LoraSession
from lora_export.formats.adapter_files import read_adapter_tensors, write_adapter_tensors

TOL = 1e-5


@pytest.fixture(scope="module")
def served(llama_case):
    sess = LoraSession(llama_case.model)
    sess.load_adapter("a", llama_case.out_dir / "a_r4.onnx_adapter")
    sess.load_adapter("b", llama_case.out_dir / "b_r8.safetensors")
    sess.load_adapter("dora", llama_case.adapters["c_dora"])  # a PEFT directory, converted in memory
    return sess


def test_switching_adapters_per_call(served, llama_case):
    assert served.providers[0] == "CPUExecutionProvider" or served.device_type == "cuda"
    assert served.adapters == ["a", "b", "dora"]
    expected = {"a": "a_r4", "b": "b_r8", "dora": "c_dora"}
    for _ in range(2):  # switch back and forth: nothing sticks between calls
        for name, ref in expected.items():
            out = served.run(None, llama_case.feeds, adapter=name)[0]
            assert rel_err(out, llama_case.refs[ref]) <= TOL, name
        assert rel_err(served.run(["output"], llama_case.feeds)[0], llama_case.base_ref) <= TOL


def test_errors_are_one_line_and_session_keeps_serving(served, llama_case, gpt2_case, tmp_path):
    def refused(fn, *words):
        with pytest.raises(LoraExportError) as info:
            fn()
        msg = str(info.value)
        assert "\n" not in msg and all(w in msg for w in words), msg

    refused(lambda: served.run(None, llama_case.feeds, adapter="nope"), "nope")
    refused(lambda: served.load_adapter("a", llama_case.out_dir / "a_r4.onnx_adapter"), "already loaded")
    refused(lambda: served.unload_adapter("nope"), "nope")
    # An adapter for another model (GPT-2's c_attn slots).
    refused(lambda: served.load_adapter("x", gpt2_case.out_dir / "lora.onnx_adapter"), "another model")
    refused(lambda: served.load_adapter("x", gpt2_case.adapters["lora"]), "c_attn")
    tensors = read_adapter_tensors(llama_case.out_dir / "a_r4.safetensors")
    wrong_dtype = {k: v.astype(np.float64) for k, v in tensors.items()}
    refused(lambda: served.load_adapter("x", wrong_dtype), "float64")
    key = "model.layers.0.self_attn.q_proj.lora_A"
    wrong_shape = dict(tensors, **{key: np.zeros((31, 4), np.float32)})
    refused(lambda: served.load_adapter("x", wrong_shape), key)
    half = {key: tensors[key]}
    refused(lambda: served.load_adapter("x", half), "both lora_A and lora_B")
    corrupt = tmp_path / "corrupt.onnx_adapter"
    corrupt.write_bytes(b"not a flatbuffer at all" * 10)
    refused(lambda: served.load_adapter("x", corrupt), "corrupt.onnx_adapter")
    truncated = tmp_path / "trunc.onnx_adapter"
    truncated.write_bytes((llama_case.out_dir / "a_r4.onnx_adapter").read_bytes()[:100])
    refused(lambda: served.load_adapter("x", truncated), "trunc.onnx_adapter")
    assert "x" not in served.adapters
    assert rel_err(served.run(None, llama_case.feeds, adapter="a")[0], llama_case.refs["a_r4"]) <= TOL


def test_load_unload_and_subset_adapter(llama_case, tmp_path):
    sess = LoraSession(llama_case.model, providers=["CPUExecutionProvider"])
    tensors = read_adapter_tensors(llama_case.out_dir / "a_r4.safetensors")
    # Only one slot filled: the others keep their rank-0 defaults.
    q0 = "model.layers.0.self_attn.q_proj"
    subset = {k: v for k, v in tensors.items() if k.startswith(q0 + ".")}
    path = write_adapter_tensors(tmp_path / "subset.onnx_adapter", subset)
    sess.load_adapter("subset", path)
    out = sess.run(None, llama_case.feeds, adapter="subset")[0]
    assert 0 < rel_err(out, llama_case.base_ref) and rel_err(out, llama_case.refs["a_r4"]) > TOL
    sess.unload_adapter("subset")
    assert sess.adapters == []
    sess.load_adapter("subset", path)  # the name is free again


def test_concurrent_runs_with_different_adapters(served, llama_case):
    expected = {"a": llama_case.refs["a_r4"], "b": llama_case.refs["b_r8"], "dora": llama_case.refs["c_dora"]}
    expected[None] = llama_case.base_ref
    names = list(expected)
    errors: list[str] = []

    def worker(i: int) -> None:
        for j in range(6):
            name = names[(i + j) % len(names)]
            out = served.run(None, llama_case.feeds, adapter=name)[0]
            if rel_err(out, expected[name]) > TOL:
                errors.append(f"thread {i} adapter {name}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_plain_model_is_refused(llama_case):
    with pytest.raises(LoraExportError, match="not an injected model"):
        LoraSession(llama_case.base_onnx, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case_name", ["llama_case", "gpt2_case", "conv_case"])
def test_base_session_equals_plain_base_model(case_name, request):
    """The branch-free twin (LoRA/DoRA on MatMul, Gemm+bias, Conv, Gather) computes the base model exactly."""
    case = request.getfixturevalue(case_name)
    sess = LoraSession(case.model, providers=["CPUExecutionProvider"], base_session=True)
    assert sess.base_session is not None
    twin_inputs = {i.name for i in sess.base_session.get_inputs()}
    assert twin_inputs.isdisjoint(sess._slot_inputs) and twin_inputs <= set(sess._inputs)
    plain = ort.InferenceSession(str(case.base_onnx), providers=["CPUExecutionProvider"])
    for seed in (101, 202):
        feeds = feeds_of(case.make_inputs(seed))
        want = plain.run(None, feeds)[0]
        got = sess.run(None, feeds)[0]
        assert got.shape == want.shape and rel_err(got, want) <= 1e-6
        rank0 = LoraSession(case.model, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        assert rel_err(rank0, want) <= 1e-6
    # Adapters still run on the main session.
    name = next(iter(case.refs))
    if (case.out_dir / f"{name}.onnx_adapter").is_file():
        sess.load_adapter(name, case.out_dir / f"{name}.onnx_adapter")
        assert rel_err(sess.run(None, case.feeds, adapter=name)[0], case.refs[name]) <= TOL


def test_base_session_shares_initializer_memory(llama_case):
    """Both sessions read the very same buffer: writing into it changes both sessions' outputs alike.

    The embedding table is read by Gather (never prepacked), so the write shows in the outputs.
    """
    sess = LoraSession(llama_case.model, providers=["CPUExecutionProvider"], base_session=True)
    sess.load_adapter("zero", {})  # no tensors: the main session with its rank-0 branches
    embed = next(k for k, v in sess._shared.items() if "embed" in k)
    value = sess._shared[embed]
    before_twin = sess.run(None, llama_case.feeds)[0]
    before_main = sess.run(None, llama_case.feeds, adapter="zero")[0]
    assert rel_err(before_twin, before_main) <= 1e-6
    shape = value.shape()
    buffer = (ctypes.c_float * int(np.prod(shape))).from_address(value.data_ptr())
    table = np.ctypeslib.as_array(buffer).reshape(shape)
    saved = table.copy()
    try:
        table *= 2.0
        after_twin = sess.run(None, llama_case.feeds)[0]
        after_main = sess.run(None, llama_case.feeds, adapter="zero")[0]
    finally:
        table[...] = saved
    assert rel_err(after_twin, before_twin) > 1e-3  # the twin reads the shared buffer
    assert rel_err(after_main, after_twin) <= 1e-6  # and so does the main session

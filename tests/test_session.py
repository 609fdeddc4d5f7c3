"""LoraSession: adapters loaded once, switched per call, validated, thread-safe; errors leave it serving."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from inject_fixtures import gpt2_case_fixture, llama_case_fixture, rel_err  # noqa: F401

from lora_export import LoraExportError, LoraSession
from lora_export.adapter_files import read_adapter_tensors, write_adapter_tensors

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

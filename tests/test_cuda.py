"""The runtime on the CUDA EP: adapter tensors live on the device; results match the CPU path.

Skipped unless ONNX Runtime's CUDA EP actually works (a session on it can be created), not merely listed.
"""

from __future__ import annotations

import pytest
from inject_fixtures import llama_case_fixture, rel_err  # noqa: F401

from lora_export import LoraSession
from lora_export.runtime.session import cuda_works

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not cuda_works(), reason="ONNX Runtime's CUDA EP does not work here"),
]


def test_cuda_session_matches_peft(llama_case):
    sess = LoraSession(llama_case.model)
    assert sess.providers[0] == "CUDAExecutionProvider" and sess.device_type == "cuda"
    sess.load_adapter("a", llama_case.out_dir / "a_r4.onnx_adapter")
    sess.load_adapter("dora", llama_case.out_dir / "c_dora.onnx_adapter")
    # Resident on the device: binding them per call copies nothing from the host.
    assert {v.device_name().lower() for v in sess._adapters["a"].values()} == {"cuda"}
    # TF32/fused kernels on GPU: a looser tolerance than the CPU tests.
    for name, ref in (("a", "a_r4"), ("dora", "c_dora")):
        assert rel_err(sess.run(None, llama_case.feeds, adapter=name)[0], llama_case.refs[ref]) <= 1e-3
    assert rel_err(sess.run(None, llama_case.feeds)[0], llama_case.base_ref) <= 1e-3

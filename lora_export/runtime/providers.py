"""Which execution providers really work here: a listed CUDA EP may lack its libraries."""

from __future__ import annotations

import functools

import onnxruntime as ort


@functools.cache
def cuda_works() -> bool:
    """True when a session actually runs on the CUDA EP (listed is not enough: its libraries may be missing)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    # A failed CUDA library load is logged by ORT's process-wide logger, whatever the session's level;
    # silence it for the probe: falling back to the CPU is the expected outcome on machines without a GPU.
    ort.set_default_logger_severity(4)
    try:
        return _probe_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])[:1] == ["CUDAExecutionProvider"]
    except Exception:  # noqa: BLE001 - any failure means CUDA is unusable here
        return False
    finally:
        ort.set_default_logger_severity(2)  # ORT's default: warnings and above


def _probe_providers(providers: list[str]) -> list[str]:
    """The providers a one-node session actually gets."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers).get_providers()

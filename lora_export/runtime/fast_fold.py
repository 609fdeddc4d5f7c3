"""The switch's fast path: ``merged_value`` + the layout's ``write`` for a plain float32 MatMul/Gemm weight,
computed straight into the buffer the session reads, with no temporary weight-sized arrays but one scratch.

The operations are merge's, in merge's order and operand layouts (see ``graph.merge.merged_value`` and
``delta.lora_delta``), so the stored result is bit for bit what ``lora-export merge`` writes:
  stored as W (out, in)   (Gemm transB=1, MatMul through a Transpose):  W₀ + (B·A)·s
  stored as Wᵀ (in, out)  (MatMul, Gemm transB=0):                        W₀ᵀ + (Aᵀ·Bᵀ)·s
(``tests/test_merged_session.py`` compares every switched weight with merge's file bit for bit.) Everything
else (DoRA, packed slices, fp16/bf16, quantized or plugin layouts) takes the general path. Also here: the
OrtValues over the session's buffers, and the copy into a buffer that holds the weight transposed.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort

from ..errors import DtypeError
from ..graph.ops.layouts import GemmLayout, MatMulLayout
from ..graph.targets.resolve import ResolvedTarget


def stored_orientation(r: ResolvedTarget) -> bool | None:
    """For a target the fast path can fold: whether its weight is stored transposed (Wᵀ); else None."""
    t = r.target
    if t.kind != "linear" or t.is_dora or type(r.layout) not in (MatMulLayout, GemmLayout):
        return None
    value = r.layout.weight_value(r.node)
    if value is not r.value or value.const_value is None or value.const_value.dtype.numpy() != np.float32:
        return None
    shape = tuple(int(d) for d in value.const_value.shape)
    if len(shape) != 2 or min(shape) < 2:  # a 1-wide weight is both C- and F-contiguous: merge's branch differs
        return None
    if isinstance(r.layout, MatMulLayout):
        transposed = not r.layout._source(r.node)[1]
    else:
        attr = r.node.attributes.get("transB")
        transposed = not (attr is not None and attr.as_int())
    want = t.weight_shape[::-1] if transposed else t.weight_shape
    return transposed if shape == tuple(want) else None


def fold_into(r: ResolvedTarget, transposed: bool, w0: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """``out`` = W₀ + ΔW in the stored orientation (float32), ``w0`` the pristine stored weight; ``scratch``
    a float32 array of ``out``'s shape."""
    t = r.target
    s = np.asarray(t.scale, dtype=np.float32)
    a = np.asarray(t.A, dtype=np.float32)
    b = np.asarray(t.B, dtype=np.float32)
    if transposed:
        np.matmul(a.T, b.T, out=scratch)
    else:
        np.matmul(b, a, out=scratch)
    np.multiply(scratch, s, out=scratch)
    np.add(w0, scratch, out=out)


class Transposer:
    """Writes a float32 matrix's transpose into an OrtValue's memory with ONNX Runtime's own Transpose
    (single-threaded; a copy: bits unchanged). A matrix whose sides are multiples of 64 is moved in 64×64 tiles
    (a 4-D transpose of the same memory): a plain transpose of a 2048×2048 matrix, rows 8 KiB apart, thrashes
    the cache (10–15 ms; tiled 6 ms; numpy's strided copy 38 ms). 768×768: 0.15 ms."""

    _TILE = 64

    def __init__(self) -> None:
        from onnx import helper

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        self._sessions = {}
        for rank, perm in ((2, [1, 0]), (4, [2, 3, 0, 1])):
            dims = [f"d{i}" for i in range(rank)]
            graph = helper.make_graph(
                [helper.make_node("Transpose", ["x"], ["y"], perm=perm)],
                "transpose",
                [helper.make_tensor_value_info("x", 1, dims)],
                [helper.make_tensor_value_info("y", 1, [dims[i] for i in perm])],
            )
            model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
            self._sessions[rank] = ort.InferenceSession(
                model.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )

    def __call__(self, src: np.ndarray, dst: ort.OrtValue) -> None:
        """``dst`` (an OrtValue of shape ``src.shape[::-1]``) ← ``src``ᵀ."""
        src = np.ascontiguousarray(src, dtype=np.float32)
        rows, cols = src.shape
        t = self._TILE
        if rows % t == 0 and cols % t == 0 and min(rows, cols) > t:
            # src as (rows/t, t, cols/t, t) tiles; dst's memory as (cols/t, t, rows/t, t): dst tile (j, i) = src
            # tile (i, j) transposed, i.e. perm (2, 3, 0, 1).
            x = src.reshape(rows // t, t, cols // t, t)
            session, shape = self._sessions[4], [cols // t, t, rows // t, t]
        else:
            x, session, shape = src, self._sessions[2], None
        binding = session.io_binding()
        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
        if shape is None:
            binding.bind_ortvalue_output("y", dst)
        else:
            binding.bind_output("y", "cpu", 0, np.float32, shape, dst.data_ptr())
        session.run_with_iobinding(binding)


def ort_value(arr: np.ndarray, device: str) -> ort.OrtValue:
    """An OrtValue over ``arr``'s memory (CPU), or a device copy of it."""
    if arr.dtype == ml_dtypes.bfloat16:
        # ortvalue_from_numpy refuses numpy's opaque bfloat16: hand ORT the bits with the ONNX type.
        if device != "cpu":
            raise DtypeError("bfloat16 weights on a device: not supported by MergedSession; use the CPU provider")
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), 16)
    return ort.OrtValue.ortvalue_from_numpy(arr, device, 0)

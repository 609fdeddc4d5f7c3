"""The switch's fast path: ``merged_value`` + the layout's ``write`` for a plain float32 MatMul/Gemm weight,
computed straight into the buffer the session reads, with no temporary weight-sized arrays but one scratch.

The operations are merge's, in merge's order and operand layouts (see ``graph.merge.merged_value`` and
``delta.lora_delta``), so the stored result is bit for bit what ``lora-export merge`` writes:
  stored as W (out, in)   (Gemm transB=1, MatMul through a Transpose):  W₀ + (B·A)·s
  stored as Wᵀ (in, out)  (MatMul, Gemm transB=0):                        W₀ᵀ + (Aᵀ·Bᵀ)·s
(``tests/test_merged_session.py`` compares every switched weight with merge's file bit for bit.) Everything
else (DoRA, packed slices, fp16/bf16, quantized or plugin layouts) takes the general path.
"""

from __future__ import annotations

import numpy as np

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

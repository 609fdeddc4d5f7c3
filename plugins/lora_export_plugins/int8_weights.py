"""int8/uint8 weights: the quantized tensors of one weight (``QWeight``) and their pure math — dequantize,
requantize with the same scheme as ONNX Runtime's quantizer, the error report. The layouts are in ``int8``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lora_export.errors import ModelError

_INT_TYPES = (ir.DataType.INT8, ir.DataType.UINT8)


@dataclass
class QWeight:
    """A quantized weight: Wq (in, out), its scale and zero point, and how they broadcast."""

    q: ir.Value
    scale: ir.Value
    zero_point: ir.Value | None
    per_channel: bool

    @property
    def dtype(self) -> ir.DataType:
        return self.q.const_value.dtype

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q int32 (in, out), scale float32 broadcastable, zp int32 broadcastable)."""
        q = self.q.const_value.numpy().astype(np.int32)
        scale = self.scale.const_value.numpy().astype(np.float32).reshape(-1)
        zp = (
            self.zero_point.const_value.numpy().astype(np.int32).reshape(-1)
            if self.zero_point is not None
            else np.zeros(1, np.int32)
        )
        if not self.per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        return q, scale, zp

    def dequantized(self) -> np.ndarray:
        """W (in, out) as float32, exactly as DequantizeLinear computes it."""
        q, scale, zp = self.arrays()
        return ((q - zp).astype(np.float32) * scale).astype(np.float32)

    def scheme(self) -> dict:
        _, _, zp = self.arrays()
        mid = 0 if self.dtype == ir.DataType.INT8 else 128
        return {
            "dtype": self.dtype.name.lower(),
            "granularity": "per-channel" if self.per_channel else "per-tensor",
            "symmetric": bool(np.all(zp == mid)) or self.zero_point is None,
        }

    def check_private(self, readers: list[ir.Node], what: str) -> None:
        """Refuse when Wq, its scale or zero point is read by any node but ``readers``."""
        own = {id(n) for n in readers}
        for v in (self.q, self.scale, self.zero_point):
            if v is None:
                continue
            others = [u.node for u in v.uses() if id(u.node) not in own]
            if others or v.is_graph_output():
                who = f"{others[0].op_type} {others[0].name!r}" if others else "a graph output"
                raise ModelError(
                    f"{what}: quantized tensor {v.name!r} is shared with {who}; a LoRA change would change it too "
                    "(requantize without weight sharing)"
                )


def _const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _qweight(q: ir.Value | None, scale: ir.Value | None, zp: ir.Value | None, axis: int) -> QWeight | None:
    """A QWeight when the tensors are a 2-D int8/uint8 weight with a per-tensor or per-output-channel scale."""
    if not (_const(q) and _const(scale)) or (zp is not None and not _const(zp)):
        return None
    if q.const_value.dtype not in _INT_TYPES or len(q.const_value.shape) != 2:
        return None
    if not scale.const_value.dtype.is_floating_point():
        return None
    if zp is not None and zp.const_value.dtype != q.const_value.dtype:
        return None
    out = int(q.const_value.shape[1])
    n = int(np.prod([int(d) for d in scale.const_value.shape], dtype=np.int64))
    if len(scale.const_value.shape) == 0 or (n == 1 and len(scale.const_value.shape) == 1 and out != 1):
        per_channel = False
    elif len(scale.const_value.shape) == 1 and n == out and axis in (1, -1):
        per_channel = True
    else:
        return None
    if zp is not None and int(np.prod([int(d) for d in zp.const_value.shape], dtype=np.int64)) != n:
        return None
    return QWeight(q, scale, zp, per_channel)


def _limits(dtype: ir.DataType, symmetric: bool) -> tuple[int, int]:
    if dtype == ir.DataType.INT8:
        return (-127, 127) if symmetric else (-128, 127)
    return 0, 255


def requantize(qw: QWeight, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``stored`` (in, out) with ``qw``'s scheme, as onnxruntime's quantizer computes scale and zero point.

    Returns (q in the weight's dtype, scale in the scale's dtype, zero point in the weight's dtype), shaped
    like the stored tensors.
    """
    scheme = qw.scheme()
    symmetric = scheme["symmetric"]
    qmin, qmax = _limits(qw.dtype, symmetric)
    axis = 0 if qw.per_channel else None
    lo = np.minimum(stored.min(axis=axis), 0).astype(np.float32)
    hi = np.maximum(stored.max(axis=axis), 0).astype(np.float32)
    if qw.zero_point is None:
        # No zero point input: zero stays 0; the scale covers what a zero point of 0 can.
        zp = np.zeros_like(lo, dtype=np.float32)
        span = np.maximum(np.abs(lo), hi) if qw.dtype == ir.DataType.INT8 else hi
        scale = (span / np.float32(qmax)).astype(np.float32)
    elif symmetric:
        absmax = np.maximum(np.abs(lo), hi)
        lo, hi = -absmax, absmax
        scale = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
        zp = np.round(np.float32((qmin + qmax) / 2.0)) * np.ones_like(scale)
    else:
        scale = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    if qw.zero_point is not None and not symmetric:
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    # The scale as stored (fp16 scales round here) is the one DequantizeLinear will use.
    scale_dtype = qw.scale.const_value.dtype.numpy()
    scale = scale.astype(scale_dtype)
    q = np.clip(np.rint(stored / scale.astype(np.float32)) + zp, qmin, qmax)
    int_dtype = qw.dtype.numpy()
    scale_shape = tuple(int(d) for d in qw.scale.const_value.shape)
    return q.astype(int_dtype), scale.reshape(scale_shape), zp.astype(int_dtype)


def _store(value: ir.Value, arr: np.ndarray) -> None:
    old = value.const_value
    shape = tuple(int(d) for d in old.shape)
    value.const_value = ir.tensor(np.ascontiguousarray(arr.reshape(shape)), dtype=old.dtype, name=old.name)


def write_quantized(qw: QWeight, canonical: np.ndarray) -> dict:
    """Requantize a canonical (out, in) weight into ``qw``'s tensors; returns the requantization report."""
    before = qw.dequantized()
    merged = np.asarray(canonical, dtype=np.float32).T
    q, scale, zp = requantize(qw, merged)
    _store(qw.q, q)
    _store(qw.scale, scale)
    if qw.zero_point is not None:
        _store(qw.zero_point, zp)
    after = qw.dequantized()
    err = after - merged
    delta = merged - before
    delta_norm = float(np.linalg.norm(delta))
    return {
        **qw.scheme(),
        "requant_max_abs": float(np.abs(err).max()) if err.size else 0.0,
        "requant_rel_frobenius": float(np.linalg.norm(err) / max(float(np.linalg.norm(merged)), 1e-30)),
        # 1 − ‖realized ΔW − ΔW‖ / ‖ΔW‖: 1 when the whole LoRA change survives requantization, ≤ 0 when lost.
        "delta_kept": 1.0 - float(np.linalg.norm((after - before) - delta)) / delta_norm if delta_norm else 1.0,
    }


def _holds(qw: QWeight, w: np.ndarray) -> bool:
    """Whether dequantized Wq is ``w`` (torch (out, in) or stored (in, out)) within half a quantization step."""
    w = np.asarray(w, dtype=np.float32)
    deq = qw.dequantized()
    _, scale, _ = qw.arrays()
    bound = np.abs(scale) * np.float32(0.5 * (1 + 1e-3)) + np.float32(1e-7)
    for cand in (w.T, w):
        if cand.shape == deq.shape and bool(np.all(np.abs(cand - deq) <= bound)):
            return True
    return False


_DQ_TYPES = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16)


def dequantize_linear(
    q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int, block_size: int, scale_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray] | None:
    """ONNX DequantizeLinear, y = (q − zp)·scale, per tensor, per axis or blocked along ``axis``, in float32; with
    the per-entry bound within which any float W that rounds to q lies: half a step, plus the rounding of y into
    the scale's dtype. None for a scale or zero point that does not broadcast as the operator defines."""
    axis = axis + q.ndim if axis < 0 else axis
    scale = scale.astype(np.float32)
    zp = np.zeros((), np.int64) if zp is None else zp.astype(np.int64)
    if scale.size == 1 and (zp.size == 1):
        scale, zp = scale.reshape(()), zp.reshape(())
    elif block_size > 0:
        if not 0 <= axis < q.ndim or scale.ndim != q.ndim or zp.shape not in ((), scale.shape):
            return None
        if scale.shape[axis] != -(-q.shape[axis] // block_size):
            return None
        scale = np.repeat(scale, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
        zp = zp if zp.ndim == 0 else np.repeat(zp, block_size, axis=axis).take(range(q.shape[axis]), axis=axis)
        if scale.shape != q.shape:
            return None
    else:
        if not 0 <= axis < q.ndim or scale.ndim != 1 or scale.shape[0] != q.shape[axis]:
            return None
        if zp.size not in (1, scale.size):
            return None
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape if zp.size > 1 else ())
    y = ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)
    try:
        eps = np.float32(np.finfo(scale_dtype).eps)
    except (TypeError, ValueError):  # bfloat16 is not a numpy float: its epsilon
        eps = np.float32(2.0**-7)
    bound = np.abs(scale) * np.float32(0.5 * (1 + 1e-3)) + np.float32(1e-7) + np.abs(y) * eps
    return y, np.broadcast_to(bound, y.shape)


def _scalar(value: ir.Value) -> bool:
    return int(np.prod([int(d) for d in value.const_value.shape], dtype=np.int64)) == 1


def _table_axis(gather: ir.Node, out: ir.Value, axis: int, per_tensor: bool) -> int | None:
    """The table's axis that DequantizeLinear's ``axis`` on Gather's output refers to (any, per tensor); None
    when it runs along the indices' dimensions (a scale per position, not a property of the table)."""
    if per_tensor:
        return 0
    table_rank = len(gather.inputs[0].const_value.shape) if _const(gather.inputs[0]) else None
    if out.shape is None or table_rank is None:
        return None
    g_axis = gather.attributes["axis"].as_int() if "axis" in gather.attributes else 0
    g_axis = g_axis + table_rank if g_axis < 0 else g_axis
    out_rank = len(out.shape)
    k = out_rank - table_rank + 1  # the indices' rank
    axis = axis + out_rank if axis < 0 else axis
    if axis < g_axis:
        return axis
    if axis >= g_axis + k:
        return axis - k + 1
    return None


def _single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


# -- QDQ: DequantizeLinear(Wq) → MatMul ---------------------------------------------------------------

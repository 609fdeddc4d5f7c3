"""The LoRA math as pure numpy functions: ΔW, DoRA norms and merged weights.

Deltas are computed in float32 (float64 on request) whatever the adapter or model dtype, and only the
final weight is rounded to the stored dtype: one rounding, as PEFT's fp32 merge does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import ShapeError

if TYPE_CHECKING:  # the math reads a target's fields; it never builds one
    from .adapter import LoraTarget


def lora_delta(t: LoraTarget, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """ΔW = s·B·A in the torch module's weight layout (see ``adapter`` for the layouts)."""
    a = np.asarray(t.A, dtype=dtype)
    b = np.asarray(t.B, dtype=dtype)
    s = np.asarray(t.scale, dtype=dtype)
    if t.kind == "linear":
        return (b @ a) * s
    if t.kind == "embedding":
        return (b @ a).T * s
    check_mergeable(t)
    # B is 1x1, so the composed kernel is a matmul over the flattened A kernel.
    r = a.shape[0]
    out = (b.reshape(b.shape[0], r) @ a.reshape(r, -1)) * s
    return out.reshape(b.shape[0], *a.shape[1:])


def check_mergeable(t: LoraTarget) -> None:
    """Refuse targets whose ΔW has no form in the base weight's layout."""
    if t.kind == "conv" and t.groups != 1:
        # PEFT's grouped-conv LoRA: a dense A conv then a grouped 1x1 B conv. Its sum mixes channels
        # across groups, which no grouped base kernel can hold, so it has no merged form.
        raise ShapeError(
            f"{t.name}: LoRA on a grouped convolution (groups={t.groups}) cannot be folded into the "
            "base kernel; use inject instead of merge"
        )


def dora_norm_axes(kind: str, ndim: int) -> tuple[int, ...]:
    """Axes reduced by DoRA's weight norm (PEFT): all but the output axis; embeddings per dim column."""
    if kind == "embedding":
        return (0,)
    return tuple(range(1, ndim))


def dora_scale(w0: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, kind: str) -> np.ndarray:
    """m / ‖W₀ + ΔW‖ per output channel (1-D), in the dtype of ``delta``.

    DoRA's norm is detached in PEFT, so at inference this is a constant per channel.
    """
    w = np.asarray(w0, dtype=delta.dtype) + delta
    norm = np.sqrt(np.sum(np.square(w), axis=dora_norm_axes(kind, w.ndim)))
    return np.asarray(magnitude, dtype=delta.dtype) / norm


def expand_channel(vec: np.ndarray, kind: str, ndim: int) -> np.ndarray:
    """Broadcast a per-channel vector against a weight in torch layout."""
    if kind == "embedding":
        return vec.reshape(1, -1)
    return vec.reshape(-1, *([1] * (ndim - 1)))


def merged_weight(w0: np.ndarray, t: LoraTarget, compute_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """W₀ + ΔW (or DoRA's m ⊙ (W₀ + ΔW)/‖W₀ + ΔW‖) in torch layout, in ``compute_dtype``.

    ``w0`` is in the torch module's layout (for fan_in_fan_out modules, already transposed back).
    The caller rounds the result once into the stored dtype.
    """
    if tuple(w0.shape) != t.weight_shape:
        raise ShapeError(f"{t.name}: adapter expects a weight of shape {t.weight_shape}, found {tuple(w0.shape)}")
    delta = lora_delta(t, compute_dtype)
    w = np.asarray(w0, dtype=compute_dtype) + delta
    if t.magnitude is None:
        return w
    g = dora_scale(w0, delta, t.magnitude, t.kind)
    return w * expand_channel(g, t.kind, w.ndim)

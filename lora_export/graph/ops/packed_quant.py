"""Packed projections whose weight is quantized: the onnxruntime-genai builder's int4 ``attn/qkv_proj``
(one ``MatMulNBits`` on concat([Wq; Wk; Wv]) along N, quantized after packing).

A quantized weight holds W only up to its rounding, so by value a target's slice is an offset o where
every entry of the target's base weight lies within the layout's quantization bound of the dequantized
rows [o, o + width) (``OpLayout.value_bounds``: the same criterion as the layout's ``holds``); exactly
one such offset in exactly one weight, or unmatched. ``QuantPackedSlice`` reads those rows dequantized,
merges by requantizing those output columns only (``OpLayout.write_rows``: blocks run along K per column,
so the other columns stay bit-identical; the layout reports the rounding error), and injects the float
branch with B′ zero-padded to the packed width (exact against the dequantized base).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..match.value_match import graph_tensors
from .layouts import OpLayout
from .packed import PackedSlice, find_packed, held_elsewhere

_SAMPLES = 8


def quant_packable(layout: OpLayout) -> bool:
    """Whether a lossy layout can hold packed slices (bounds to find them, row writes to merge them)."""
    return (
        getattr(layout, "lossy_write", False)
        and type(layout).value_bounds is not OpLayout.value_bounds
        and type(layout).write_rows is not OpLayout.write_rows
    )


@dataclass(eq=False)
class QuantPackedSlice(PackedSlice):
    """Rows [offset, offset + width) of a quantized packed weight (canonical (N, K) rows = output columns)."""

    lossy_write = True  # merge requantizes the slice: only with --requantize (or --into-float)

    def read(self, node: ir.Node) -> np.ndarray:
        return np.ascontiguousarray(self.inner.read(node)[self._rows()])

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        self.inner.write_rows(node, self.offset, np.asarray(canonical))

    @property
    def last_write_report(self) -> dict | None:
        return getattr(self.inner, "last_write_report", None)

    @last_write_report.setter
    def last_write_report(self, value: dict | None) -> None:
        self.inner.last_write_report = value

    def holds(self, node: ir.Node, w: np.ndarray) -> bool:
        bounds = self.inner.value_bounds(node)
        if bounds is None:
            return False
        deq, bound = (b[self._rows()] for b in bounds)
        return bool(within_offsets(deq, bound, w, self.inner.activation_dtype(node).numpy()) == [0])

    def value_bounds(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
        bounds = self.inner.value_bounds(node)
        return None if bounds is None else tuple(b[self._rows()] for b in bounds)


def within_offsets(deq: np.ndarray, bound: np.ndarray, w: np.ndarray, dtype: np.dtype) -> list[int]:
    """Every row offset o where ``w`` (rounded to the activations' ``dtype``) lies within ``bound`` of
    deq[o:o+len(w)] entrywise: sampled entries narrow the offsets, then whole slices are compared."""
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[1] != deq.shape[1] or not 0 < w.shape[0] <= deq.shape[0] or not w.shape[1]:
        return []
    cast = w.astype(dtype).astype(np.float32)
    out, n = cast.shape
    cand = np.arange(deq.shape[0] - out + 1)
    rng = np.random.default_rng(0)
    for i, j in zip(rng.integers(0, out, _SAMPLES), rng.integers(0, n, _SAMPLES), strict=True):
        cand = cand[np.abs(deq[cand + i, j] - cast[i, j]) <= bound[cand + i, j]]
        if not len(cand):
            return []
    rows = [int(o) for o in cand if np.all(np.abs(deq[o : o + out] - cast) <= bound[o : o + out])]
    return rows


def find_packed_quantized(
    candidates: Iterable[tuple[ir.Node, OpLayout, ir.Value]], t, w: np.ndarray, cache: dict
) -> tuple[list[tuple], int]:
    """(every (node, QuantPackedSlice, value) whose quantized weight holds ``t``'s base weight ``w`` as a
    proper slice, how many quantized weights hold ``w`` whole). ``cache`` keeps each node's bounds for the
    resolution (dequantizing is the expensive part)."""
    out_t, n_in = (int(d) for d in t.weight_shape)
    hits, whole = [], 0
    if t.kind != "linear" or np.ndim(w) != 2 or not np.ptp(np.asarray(w, dtype=np.float64)):
        return [], 0  # a constant weight proves nothing by value
    views = [v for v in (np.asarray(w), np.asarray(w).T) if v.shape == (out_t, n_in)][:1]
    seen = set()
    for node, layout, value in candidates:
        if not quant_packable(layout) or id(value) in seen:
            continue
        seen.add(id(value))
        shape = layout.weight_shape(node)
        if shape is None or shape[1] != n_in or shape[0] < out_t:
            continue
        if id(node) not in cache:
            cache[id(node)] = layout.value_bounds(node)
        bounds = cache[id(node)]
        if bounds is None:
            continue
        dtype = layout.activation_dtype(node).numpy()
        for v in views:
            for off in within_offsets(*bounds, v, dtype):
                if shape[0] == out_t:
                    whole += 1
                else:
                    hits.append((node, QuantPackedSlice(layout, off, out_t), value))
    return hits, whole


def the_packed_slice(model: ir.Model, candidates: list, t, w: np.ndarray, cache: dict) -> tuple | None:
    """The one (node, slice layout, value) whose weight holds ``w`` as a slice, exactly (float) or within its
    rounding (quantized), when no other weight holds it whole or as a slice and no other graph tensor holds
    it; else None (nothing is guessed)."""
    hits = find_packed(candidates, t, w)
    quantized, whole = find_packed_quantized(candidates, t, w, cache)
    hits += quantized
    if len(hits) != 1 or whole:
        return None
    if held_elsewhere(graph_tensors(model), w, hits[0][2]):
        return None
    return hits[0]

"""Packed projections: one weight holding several modules' weights side by side (fused Q/K/V).

The onnxruntime-genai builder packs q/k/v into one ``attn/qkv_proj`` MatMul whose weight is
``concat([Wqᵀ, Wkᵀ, Wvᵀ], axis=1)``. Names cannot say which columns are whose, so a target is placed in
such a weight only by value (``--base-weights``): its W (or Wᵀ, as the op stores it) must occur, exactly
and in the stored dtype, as one contiguous slice along the output axis of exactly one float 2-D weight
of a ``MatMul`` (directly or through a Transpose) or ``Gemm``. Zero or several such slices: unmatched.

``PackedSlice`` is the op layout of one such slice: it reads and writes that slice only (merge rounds
once into the stored dtype; the other slices stay bit-identical), and its LoRA branch pads B′ (r, width)
with zero columns to (r, total) so the branch output lands in the slice; inject gives the q, k and v slots
(any ranks) of one packed op one branch together (``packed_branch``). DoRA merges into a slice (its norm
is per output row, and a slice holds whole rows); a DoRA branch is refused (its g would scale the whole
packed output). The slice found must be the only place W occurs in the graph, and a packed weight read by
more than one node (shared, or its module called twice) is refused for now.

Layouts with ``packed_weight`` (plugins: ONNX Runtime's fused ``Attention``) are searched the same way; their
``add_branch`` receives the padded B′ and decides how the branch reaches the op (see the plugin).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lora_export.errors import ModelError

from ..match.value_match import tensor_equals
from .branches import _const
from .consumers import layout_users, other_readers
from .layouts import GemmLayout, MatMulLayout, OpLayout, store

_SAMPLES = 8


def _out_major(node: ir.Node, inner: OpLayout) -> bool:
    """Whether the stored weight is (out, in) (Gemm transB=1, MatMul through a Transpose), else (in, out)."""
    if isinstance(inner, GemmLayout):
        return inner._trans_b(node)
    return inner._source(node)[1]


def _canonical_view(node: ir.Node, inner: OpLayout) -> np.ndarray | None:
    """The stored weight (stored dtype) viewed as (total, in), or None if unreadable or not float."""
    value = inner.weight_value(node)
    tensor = value.const_value if value is not None else None
    if tensor is None or not tensor.dtype.is_floating_point() or len(tensor.shape) != 2:
        return None
    try:
        stored = tensor.numpy()
    except Exception:  # noqa: BLE001 - an unreadable tensor holds no base weight
        return None
    return stored if _out_major(node, inner) else stored.T


def slice_offsets(canon: np.ndarray, w: np.ndarray) -> list[int]:
    """Every row offset o with canon[o:o+len(w)] == w exactly (w cast into canon's dtype): a few sampled
    entries narrow the candidate offsets, then whole slices are compared."""
    w = np.asarray(w)
    if w.ndim != 2 or canon.ndim != 2 or w.shape[1] != canon.shape[1] or w.shape[0] > canon.shape[0]:
        return []
    cast = w.astype(canon.dtype, copy=False)
    out, n = w.shape
    if out == 0 or n == 0:
        return []
    cand = np.arange(canon.shape[0] - out + 1)
    rng = np.random.default_rng(0)
    for i, j in zip(rng.integers(0, out, _SAMPLES), rng.integers(0, n, _SAMPLES), strict=True):
        cand = cand[canon[cand + i, j] == cast[i, j]]
        if not len(cand):
            return []
    return [int(o) for o in cand if np.array_equal(canon[o : o + out], cast)]


@dataclass(eq=False)
class PackedSlice(OpLayout):
    """The layout of one target's slice [offset, offset+width) of a packed MatMul/Gemm weight (canonical rows)."""

    inner: OpLayout
    offset: int
    width: int
    kind = "linear"
    per_target = True  # bound to one target: inject calls this layout, not the op's registered one

    @property
    def op_type(self) -> str:  # type: ignore[override]
        return self.inner.op_type

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        return self.inner.weight_value(node)

    def total(self, node: ir.Node) -> int:
        return self.inner.weight_shape(node)[0]

    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        shape = self.inner.weight_shape(node)
        return None if shape is None else (self.width, shape[1])

    def _rows(self) -> slice:
        return slice(self.offset, self.offset + self.width)

    def read(self, node: ir.Node) -> np.ndarray:
        canon = _canonical_view(node, self.inner)
        if canon is None:
            raise ModelError(f"{self.weight_value(node).name!r}: a packed weight must be a readable float tensor")
        part = canon[self._rows()]
        if part.dtype != np.float64:
            part = part.astype(np.float32)
        # Stored (in, out): hand merge the transposed-contiguous slice (its storage-order fast path).
        return part if _out_major(node, self.inner) else np.ascontiguousarray(part.T).T

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        value = self.weight_value(node)
        stored = value.const_value.numpy().copy()
        part = np.asarray(canonical).astype(stored.dtype)  # rounded once into the stored dtype
        if _out_major(node, self.inner):
            stored[self._rows()] = part
        else:
            stored[:, self._rows()] = part.T
        store(value, stored)

    def holds(self, node: ir.Node, w: np.ndarray) -> bool:
        canon = _canonical_view(node, self.inner)
        return canon is not None and slice_offsets(canon[self._rows()], w) == [0]

    def describe(self, node: ir.Node) -> str:
        end = self.offset + self.width
        return f"{self.inner.describe(node)} packed slice [{self.offset}:{end}] of {self.total(node)}"

    def activation_dtype(self, node: ir.Node) -> ir.DataType:
        return self.inner.activation_dtype(node)

    def refuse_dora(self, node: ir.Node, stem: str) -> None:
        raise ModelError(
            f"{stem}: a DoRA adapter cannot be injected into a packed projection slice "
            f"({node.name or node.op_type}: its magnitude would rescale the other parts too); merge it instead"
        )

    def padded_b(self, graph: ir.Graph, node: ir.Node, b_value: ir.Value, stem: str) -> ir.Node:
        """Pad(B′, columns → [offset, total − offset − width]): B′ (r, width) placed in the slice, (r, total)."""
        opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0))
        if opset < 11:
            raise ModelError(f"{node.name or node.op_type}: a packed slice's branch needs opset >= 11 (Pad)")
        total = self.total(node)
        pads = np.array([0, self.offset, 0, total - self.offset - self.width], dtype=np.int64)
        pad = ir.node("Pad", [b_value, _const(graph, f"{stem}.packed_pads", pads)], name=f"{stem}/packed_pad")
        pad.outputs[0].name = f"{stem}/packed_B"
        return pad

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        """y = op(x) + (x·A′)·Pad(B′): the branch lands in the slice (inject groups the slices of one op into
        one branch, ``packed_branch``; this is its one-part case)."""
        stem = slot_stem(a_value)
        if dora_scale_value is not None:
            self.refuse_dora(node, stem)
        pad = self.padded_b(graph, node, b_value, stem)
        node.graph.insert_before(node, pad)
        self.inner.add_branch(graph, node, a_value, pad.outputs[0], None)


def slot_stem(a_value: ir.Value) -> str:
    """``<stem>`` of a slot's ``<stem>.lora_A`` input (the value's name otherwise)."""
    name = a_value.name or "lora"
    return name[: -len(".lora_A")] if name.endswith(".lora_A") else name


def held_elsewhere(tensors: Iterable[tuple[str, ir.TensorProtocol]], w: np.ndarray, value: ir.Value) -> bool:
    """Whether a graph tensor other than ``value``'s holds W (whole or as a slice): then the slice found may
    not be the only place the module is applied (a copy, or another packing), and nothing is guessed."""
    others = [(n, t) for n, t in tensors if t is not value.const_value]
    return any(tensor_equals(t, w) for _, t in others) or slice_holder(others, w) is not None


def packable(layout: OpLayout) -> bool:
    """Whether a layout's weight may hold packed parts: plain MatMul/Gemm, or a ``packed_weight`` layout built
    on them (ONNX Runtime's fused Attention, a plugin); quantized and other layouts are not read by value."""
    if type(layout) in (MatMulLayout, GemmLayout):
        return True
    return layout.packed_weight and isinstance(layout, (MatMulLayout, GemmLayout))


def find_packed(candidates: Iterable[tuple[ir.Node, OpLayout, ir.Value]], t, w: np.ndarray) -> list[tuple]:
    """Every (node, PackedSlice, value) whose weight holds ``t``'s base weight ``w`` as a proper slice;
    one entry per distinct (weight, offset)."""
    out_t, n_in = (int(d) for d in t.weight_shape)
    hits, seen = [], set()
    if t.kind != "linear" or np.ndim(w) != 2 or not np.ptp(np.asarray(w, dtype=np.float64)):
        return []  # a constant weight proves nothing by value
    for node, layout, value in candidates:
        if not packable(layout):
            continue
        shape = layout.weight_shape(node)
        if shape is None or shape[1] != n_in or shape[0] <= out_t:
            continue
        canon = _canonical_view(node, layout)
        if canon is None:
            continue
        for off in slice_offsets(canon, w):
            if (id(value), off) not in seen:
                seen.add((id(value), off))
                hits.append((node, PackedSlice(layout, off, out_t), value))
    return hits


def packed_readers(value: ir.Value) -> tuple[list[ir.Node], str | None]:
    """The one node applying a packed weight, or why it is refused (read by several nodes or other ops)."""
    own = [n for n, _ in layout_users(value)]
    others = other_readers(value, own[:1])
    if len(own) == 1 and not others:
        return own, None
    readers = others or [f"{n.op_type} {n.name!r}" for n in own[1:]]
    return [], (
        f"its base weight is a slice of packed weight {value.name!r}, which is also read by {readers[0]}; "
        "shared packed weights are not supported"
    )


def _both_ways(tensor: ir.TensorProtocol) -> list[np.ndarray]:
    """A float 2-D tensor's data as stored and transposed (row slices of either are packed parts), or []."""
    if len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
        return []
    try:
        stored = tensor.numpy()
    except Exception:  # noqa: BLE001 - an unreadable tensor holds no base weight
        return []
    return [stored, stored.T]


def slice_holder(tensors: Iterable[tuple[str, ir.TensorProtocol]], w: np.ndarray) -> str | None:
    """The name of a graph tensor holding W (or Wᵀ) as a proper slice: the module is in the graph, packed."""
    if np.ndim(w) != 2:
        return None
    for name, tensor in tensors:
        shape = tuple(int(d) for d in tensor.shape)
        if len(shape) != 2 or not ({w.shape[1], w.shape[0]} & set(shape)) or np.prod(shape) <= w.size:
            continue
        for canon in _both_ways(tensor):
            for part in (w, w.T):
                if part.shape[0] < canon.shape[0] and slice_offsets(canon, part):
                    return name
    return None


def tiled_by_base(tensor: ir.TensorProtocol, base_weights: Mapping[str, np.ndarray]) -> bool:
    """Whether a float 2-D tensor is, along either axis, base weights side by side (a packed Q/K/V whose
    every slice is accounted for)."""
    weights = [np.asarray(w) for w in base_weights.values() if np.ndim(w) == 2]
    for canon in _both_ways(tensor):
        fitting = [w for w in weights if w.shape[1] == canon.shape[1] and w.shape[0] < canon.shape[0]]
        off = 0
        while off < canon.shape[0] and fitting:
            w = next((w for w in fitting if 0 in slice_offsets(canon[off : off + w.shape[0]], w)), None)
            if w is None:
                break
            off += w.shape[0]
        if off == canon.shape[0]:
            return True
    return False

"""Trained biases of packed projections: a slice of a fused op's packed bias (ONNX Runtime's ``Attention``).

An adapter that trains biases (PEFT ``bias="lora_only"``) replaces each module's bias. When the module's
weight resolved to the slice [o, o+w) of a packed weight whose op adds its own packed bias (a layout's
``packed_bias``), the module's bias is that bias[o:o+w]: merge writes it there, rounded once into the stored
dtype (the other slices stay bit-identical). The slice must hold the module's base bias by value (packed
targets resolve only with ``--base-weights``, so the base bias is at hand), and the packed bias must be read
by that op alone.

Any other bias that nothing names may sit in a packed tensor too (MultiHeadAttention's packed bias; the
bias of a module whose weight is not adapted): a 1-D base bias occurring as a proper slice of a graph tensor
is never proven absent by value. It stays unmatched, so merge refuses it (or skips it with --allow-partial).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..match.module_paths import best_unique
from .layouts import OpLayout, store
from .packed import slice_offsets


@dataclass(eq=False)
class PackedBiasSlice(OpLayout):
    """The layout of one module's bias: the slice [offset, offset+width) of ``inner``'s packed bias."""

    inner: OpLayout
    offset: int
    width: int
    kind = "bias"

    @property
    def op_type(self) -> str:  # type: ignore[override]
        return self.inner.op_type

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        return self.inner.packed_bias(node)

    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        return (self.width,)

    def read(self, node: ir.Node) -> np.ndarray:
        return self.weight_value(node).const_value.numpy()[self.offset : self.offset + self.width].astype(np.float32)

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        value = self.weight_value(node)
        stored = value.const_value.numpy().copy()
        stored[self.offset : self.offset + self.width] = np.asarray(canonical).astype(stored.dtype)
        store(value, stored)

    def describe(self, node: ir.Node) -> str:
        total = self.weight_value(node).const_value.shape[0]
        return f"{self.inner.op_type} packed bias slice [{self.offset}:{self.offset + self.width}] of {total}"


def place_packed_biases(targets: Iterable, extras: Iterable, base_weights: Mapping[str, np.ndarray] | None, tensors):
    """Resolve unmatched ``<module>.bias`` extras into their packed target's op (see the module docstring);
    mark other unnamed 1-D extras held as a slice of a graph tensor as unmatched for good (not absent).

    ``targets``: ResolvedTarget list; ``extras``: ResolvedExtra list (changed in place); ``tensors``: the
    graph's (name, tensor) pairs."""
    packed = {r.target.name: r for r in targets if r.status == "matched" and r.strategy == "packed"}
    for e in extras:
        if e.status != "unmatched" or e.found_shape is not None:
            continue
        module, _, leaf = e.key.rpartition(".")
        r = packed.get(module) if leaf == "bias" else None
        bias = r.layout.inner.packed_bias(r.node) if r is not None and hasattr(r.layout, "inner") else None
        base = _base(e.key, base_weights)
        if bias is not None:
            _place(e, r, bias, base)
        elif e.unnamed and base is not None and base.ndim == 1:
            holder = _slice_holder_1d(tensors, base)
            if holder is not None:
                e.unnamed = False
                e.detail = (
                    f"its base tensor is a slice of {holder!r} (a fused op's packed bias?), which cannot be "
                    "written for this module alone"
                )


def _base(key: str, base_weights: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    if not base_weights:
        return None
    found = best_unique(key, {k: [k] for k in base_weights})[0]
    return np.asarray(base_weights[found]) if found is not None else None


def _place(e, r, bias: ir.Value, base: np.ndarray | None) -> None:
    layout = PackedBiasSlice(r.layout.inner, r.layout.offset, r.layout.width)
    e.unnamed = False
    readers = {id(u.node) for u in bias.uses()}
    stored = bias.const_value.numpy()[layout.offset : layout.offset + layout.width]
    if readers != {id(r.node)}:
        e.detail = f"packed bias {bias.name!r} is read by other nodes than {r.node.name!r}; not supported"
    elif e.shape != (layout.width,):
        e.detail = f"adapter tensor has shape {e.shape}, the module's packed slice holds {layout.width}"
    elif base is None:
        e.detail = f"no base bias for it in --base-weights (its weight is a slice of {r.value.name!r})"
    elif base.shape != stored.shape or not np.array_equal(stored, base.astype(stored.dtype)):
        e.detail = f"the slice of packed bias {bias.name!r} beside {r.target.name} does not hold its base bias"
    else:
        e.status, e.strategy, e.value, e.node, e.layout = "matched", "packed", bias, r.node, layout
        e.nodes, e.private, e.source = [r.node], False, bias
        e.detail = f"{bias.name}[{layout.offset}:{layout.offset + layout.width}] (beside {r.value.name})"


def _slice_holder_1d(tensors, w: np.ndarray) -> str | None:
    """The name of a float 1-D graph tensor longer than ``w`` holding it as a contiguous slice, or None."""
    for name, tensor in tensors:
        if len(tensor.shape) != 1 or int(tensor.shape[0]) <= w.shape[0] or not tensor.dtype.is_floating_point():
            continue
        try:
            stored = tensor.numpy()
        except Exception:  # noqa: BLE001 - an unreadable tensor holds nothing
            continue
        if slice_offsets(stored.reshape(-1, 1), w.reshape(-1, 1)):
            return name
    return None

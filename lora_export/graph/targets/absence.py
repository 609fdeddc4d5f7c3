"""Proving a target absent from a graph, and saying why one that is not absent was not found.

"Absent" lets a merge skip a target and still be exact, so it needs proof: our exporter's record, or,
with the base weights, that the target's weight is not in the graph by value while every graph tensor
that could hold it is accounted for by another base weight. Names alone prove nothing: a packed,
fused, quantized or renamed projection is missing by name too. A quantized (integer) tensor is accounted for
when every node reading it is understood by a layout (a quantized weight's ``holds``, or a dequantizing node's
``dequantized_constant``) and each reading holds another base weight within its rounding; one holding the
target's own weight makes the target present, never absent.
"""

from __future__ import annotations

import difflib

import numpy as np
import onnx_ir as ir

from lora_export.errors import some

from ..match.module_paths import best_unique, strip_wrappers
from ..match.value_match import QuantHolder, ValueIndex, base_key, quantized_holds, within_bounds
from ..ops.layouts import DequantizedConstant, get_layout, registered_layouts
from ..ops.packed import slice_holder, tiled_by_base

# Ops that hold projections we cannot address one module at a time (packed, fused or quantized).
_FUSED_OPS = {"Attention", "MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention", "QAttention"}
_QUANTIZED_OPS = {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "DequantizeLinear"}
_WAY_FORWARD = (
    "pass --base-weights to match it by value (or prove it absent); skipping it (--allow-partial) leaves its "
    "delta out, and the merged model would not compute what the adapter's model computes"
)


def absent_or_why(g, r, proven_absent, base_weights, index: ValueIndex | None) -> None:
    """Mark ``r`` absent when proven (see the module docstring); else explain why it is unmatched."""
    t = r.target
    if best_unique(t.name, {m: [m] for m in proven_absent})[0] is not None:
        r.status, r.detail = "absent", "not in the graph (proven by value at export)"
        return
    if index is not None:
        key = base_key(t.name, base_weights)
        if key is None:
            r.detail = f"no base weight for it in --base-weights; {r.detail}"
            return
        held_by = index.occurs(np.asarray(base_weights[key]))
        if held_by is not None:
            how = " (quantized)" if held_by in index.quantized else ""
            r.detail = f"its base weight is in the graph{how} as {held_by!r}, but no supported op reads it as {t.kind}"
            return
        packed_in = slice_holder(index.tensors, np.asarray(base_weights[key]))
        if packed_in is not None:
            r.detail = f"its base weight is a slice of packed weight {packed_in!r}, but no supported op reads it"
            return
        loose = _unpacked(index, index.unaccounted_for(t.weight_shape))
        if not loose:
            r.status, r.detail = "absent", "its base weight is not in the graph; every graph tensor is accounted for"
            return
        r.detail = (
            f"its base weight is not in the graph as such, and graph tensors match no base weight "
            f"({some(loose)}): maybe {_likely_cause(g, t)}"
        )
        return
    r.detail = f"not found ({r.detail}); maybe {_likely_cause(g, t)}; {_WAY_FORWARD}"


def _likely_cause(g, t) -> str:
    causes = []
    if g.ops & _FUSED_OPS or any("qkv" in p for p in g.all_module_paths):
        causes.append("packed/fused projections (one weight holds Q/K/V: --base-weights matches their slices by value)")
    quantized = g.ops & _QUANTIZED_OPS
    if quantized:
        known = {op for _, op in registered_layouts()}
        # With a plugin for the op the weight could be read; only its absence cannot be proven by value.
        causes.append(
            "quantized weights (no base weight matches their integers, so absence cannot be proven)"
            if quantized <= known
            else "quantized weights (needs a quantized layout plugin)"
        )
    near = difflib.get_close_matches(strip_wrappers(t.name), sorted(g.all_module_paths), n=2, cutoff=0.6)
    causes.append("renamed in the graph" + (f" (closest: {', '.join(near)})" if near else "") + " or not in it")
    return "; or ".join(causes)


def extra_absent(e, base_weights, index: ValueIndex) -> None:
    key = best_unique(e.key, {k: [k] for k in base_weights})[0]
    if key is None:
        return
    w = np.asarray(base_weights[key])
    if index.occurs(w) is not None or slice_holder(index.tensors, w) is not None:
        return
    if not _unpacked(index, index.unaccounted_for(e.shape)):
        e.status, e.detail = "absent", "its base tensor is not in the graph, and every graph tensor is accounted for"


def _unpacked(index: ValueIndex, names: list[str]) -> list[str]:
    """``names`` without the packed tensors whose every slice is a base weight (fused Q/K/V, all present)."""
    tensors = dict(index.tensors)
    return [n for n in names if not tiled_by_base(tensors[n], index.base_weights)]


def quantized_holders(model: ir.Model) -> dict[str, list[QuantHolder]]:
    """Every constant integer tensor some layout reads back as float weights: by name, one holder per reading,
    plus a holder with ``holds`` None when a node no layout explains reads it too (it then stays unaccounted)."""
    readings: dict[int, tuple[ir.Value, set[int], list[QuantHolder]]] = {}
    for graph in model.graphs():
        for node in graph:
            layout = get_layout(node)
            if layout is None:
                continue
            for value, reader, holds in _readings(layout, node):
                shape = tuple(int(d) for d in value.const_value.shape)
                entry = readings.setdefault(id(value), (value, set(), []))
                entry[1].add(id(reader))
                entry[2].append(QuantHolder(value.name or "", shape, holds))
    out: dict[str, list[QuantHolder]] = {}
    for value, readers, holders in readings.values():
        if value.is_graph_output() or any(id(u.node) not in readers for u in value.uses()):
            holders.append(QuantHolder(holders[0].name, holders[0].shape, None))
        out.setdefault(holders[0].name, []).extend(holders)
    return out


def _readings(layout, node):
    """(integer constant, the node reading it, holds(w)) for each way ``node`` reads a quantized constant."""
    if getattr(layout, "lossy_write", False):
        try:
            value = layout.weight_value(node)
        except Exception:  # noqa: BLE001 - a node the layout cannot parse reads nothing it can explain
            value = None
        if value is not None and value.const_value is not None and not value.const_value.dtype.is_floating_point():
            yield value, node, lambda w, layout=layout, node=node: quantized_holds(layout, node, w)
    try:
        dc = layout.dequantized_constant(node)
    except Exception:  # noqa: BLE001 - as above
        dc = None
    if dc is not None:
        yield dc.value, dc.reader, _bounded(dc)


def _bounded(dc: DequantizedConstant):
    cache: list[tuple[np.ndarray, np.ndarray]] = []

    def holds(w: np.ndarray) -> bool:
        if not cache:  # dequantize once (a large embedding table too), only when a weight of its shape is asked
            cache.append(dc.values())
        return within_bounds(*cache[0], w)

    return holds


def partial_hint(res, detail: str) -> str:
    """Offer --allow-partial as the way forward only when skipping changes nothing; else say what it costs."""
    extras = any(e.status == "unmatched" for e in res.extras)
    if not extras and all(_inert(r.target) for r in res.unmatched):
        return "; their deltas are zero, so --allow-partial merges the rest exactly"
    if "--allow-partial" in detail:  # the detail already says what skipping costs
        return ""
    return (
        "; --allow-partial would leave them out, and the merged model would not compute what the adapter's "
        "model computes"
    )


def _inert(target) -> bool:
    """A LoRA target whose delta is zero (an untrained B, a zero scale): leaving it out is exact."""
    A, B = getattr(target, "A", None), getattr(target, "B", None)
    if A is None or B is None or getattr(target, "magnitude", None) is not None:
        return False
    return getattr(target, "scale", 1.0) == 0 or not np.any(A) or not np.any(B)

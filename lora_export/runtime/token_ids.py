"""The range of token ids a model accepts, read from its graph: the rows of the embedding tables its
integer inputs index (``Gather`` data, possibly after casts and reshapes).

``verify`` draws random token ids from that range: ids past the table would make ONNX Runtime fail
(or, on some providers, read garbage) instead of comparing the models.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

# Ops that pass index values through unchanged (only their shape or type changes).
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose"}


def _gather_rows(node: ir.Node) -> int | None:
    """The size of the axis a Gather indexes, when the graph states it; else None."""
    data = node.inputs[0] if node.inputs else None
    if data is None:
        return None
    axis_attr = node.attributes.get("axis")
    axis = axis_attr.as_int() if axis_attr is not None else 0
    shape = data.const_value.shape if data.const_value is not None else data.shape
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) and dim > 0 else None


def _reached_gathers(value: ir.Value) -> Iterable[ir.Node]:
    """The Gather nodes (in every graph level) that take ``value`` as indices, through pass-through ops."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node, index in v.uses():
            if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 1:
                yield node
            elif node.op_type in _PASS_THROUGH and index == 0:
                stack.extend(node.outputs)


def token_id_bounds(model: ir.Model) -> dict[str, int | None]:
    """For each integer graph input that some Gather uses as indices: the smallest table size it indexes
    (ids must lie in ``[0, bound)``), or None when no table it indexes states its size.

    Inputs that reach no Gather are not listed."""
    out: dict[str, int | None] = {}
    for value in model.graph.inputs:
        dtype = value.dtype
        if dtype is None or not dtype.is_integer():
            continue
        gathers = list(_reached_gathers(value))
        if not gathers:
            continue
        known = [r for r in (_gather_rows(g) for g in gathers) if r is not None]
        out[value.name] = min(known) if known else None
    return out

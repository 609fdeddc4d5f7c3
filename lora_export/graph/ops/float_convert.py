"""``merge --into-float``: a quantized op becomes a float MatMul on its dequantized weight, so W₀ + ΔW is
stored exactly (rounded once into the activations' dtype) instead of being requantized.

The quantized op's layout does the op-specific part (``OpLayout.to_float``: which input is x, how the
weight dequantizes, where a bias goes); this module holds the graph surgery they share and the step of
``merge`` that converts every lossy target's node once (a packed op holding several targets included)
and points the targets at the new float weight.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from lora_export.errors import ModelError

from .consumers import free_name
from .layouts import get_layout

_QUANT_SUFFIX = re.compile(r"_Q\d+$")


def float_names(model: ir.Model, node: ir.Node, weight: ir.Value) -> tuple[str, str]:
    """(node name, initializer name) for the float MatMul replacing ``node``: the onnxruntime-genai
    builder's float names where the quantized ones follow its ``_Q4`` pattern, else ``<name>_float``."""
    head, _, last = (node.name or "MatMulNBits").rpartition("/")
    last = _QUANT_SUFFIX.sub("", last) if _QUANT_SUFFIX.search(last) else f"{last}_float"
    taken = {n.name for g in model.graphs() for n in g}
    name, i = f"{head}/{last}" if head else last, 1
    while name in taken:
        name, i = f"{head}/{last}_{i}" if head else f"{last}_{i}", i + 1
    wname = weight.name or "weight"
    hint = _QUANT_SUFFIX.sub("", wname) if _QUANT_SUFFIX.search(wname) else f"{wname}.float"
    return name, free_name(model, hint)


def replace_with_matmul(
    model: ir.Model,
    node: ir.Node,
    x: ir.Value,
    weight_in_out: np.ndarray,
    dtype: ir.DataType,
    bias: ir.Value | None = None,
) -> ir.Node:
    """Replace ``node`` (one output) by ``MatMul(x, W)`` (+ ``bias``) with W (in, out) stored in ``dtype``;
    the output keeps its name (and graph-output role); quantized initializers nobody reads any more go."""
    graph = node.graph
    if graph is None or len(node.outputs) != 1:
        raise ModelError(f"{node.op_type} {node.name!r}: cannot be replaced by a float MatMul")
    name, wname = float_names(model, node, node.inputs[1])
    weight = ir.Value(name=wname, const_value=ir.tensor(np.ascontiguousarray(weight_in_out), dtype=dtype, name=wname))
    graph.register_initializer(weight)
    mm = ir.node("MatMul", [x, weight], name=name)
    new_nodes, out = [mm], mm.outputs[0]
    if bias is not None:
        add = ir.node("Add", [out, bias], name=f"{name}/bias_add")
        new_nodes.append(add)
        out = add.outputs[0]
    graph.insert_before(node, new_nodes)
    old = node.outputs[0]
    out.type, out.shape, out_name = old.type, old.shape, old.name
    inputs = [v for v in node.inputs if v is not None]
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = out_name
    for v in inputs:
        if v.const_value is not None and not v.uses() and not v.is_graph_output() and v.name in graph.initializers:
            del graph.initializers[v.name]
    return mm


def convert_lossy(model: ir.Model, matched: list) -> list[dict]:
    """Replace the node of every lossy-layout target by its float form (once per node), and point the
    targets at it: a packed slice becomes the same slice of the float weight. Returns one entry per node."""
    from .packed import PackedSlice

    done: dict[int, ir.Node] = {}
    converted = []
    for r in matched:
        if not getattr(r.layout, "lossy_write", False):
            continue
        inner = getattr(r.layout, "inner", r.layout)
        if len(r.nodes) != 1 or r.nodes[0] is not r.node:
            raise ModelError(
                f"{r.target.name}: its quantized weight is applied by {len(r.nodes)} nodes; --into-float converts "
                "one node per weight (use --requantize or inject)"
            )
        old = r.node
        if id(old) not in done:
            entry = {"node": old.name, "op": old.op_type, "layout": inner.describe(old)}
            new = inner.to_float(model, old)
            done[id(old)] = new
            value = get_layout(new).weight_value(new)
            entry.update(into=new.name, initializer=value.name, dtype=value.const_value.dtype.name)
            converted.append(entry)
        new = done[id(old)]
        layout = get_layout(new)
        if isinstance(r.layout, PackedSlice):
            layout = PackedSlice(layout, r.layout.offset, r.layout.width)
        r.node, r.nodes, r.layout, r.value = new, [new], layout, layout.weight_value(new)
    return converted

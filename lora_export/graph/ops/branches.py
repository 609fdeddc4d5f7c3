"""LoRA side branches as ONNX subgraphs: y = op(x) + (x·A′)·B′, and DoRA's y = g ⊙ (op(x) + (x·A′)·B′) + bias.

The built-in op layouts (``layouts.py``) call these from ``OpLayout.add_branch``. A′, B′ and g are graph
values (normally graph inputs with rank-0 / all-ones defaults); the scale is already folded into B′.
The branch follows PEFT's forward, not the merged weight, so a grouped conv (PEFT's dense lora_A conv
plus grouped 1×1 lora_B) is exact even though it has no merged form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lora_export.errors import ModelError


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A small constant initializer (reshape targets); reused when it already exists."""
    if name in graph.initializers:
        return graph.initializers[name]
    value = ir.val(name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _rewire(node: ir.Node, old: ir.Value, new: ir.Value, new_nodes: list[ir.Node]) -> None:
    """Point every consumer of ``old`` (but the branch itself) at ``new``; insert the branch after ``node``.

    The branch goes into the node's own graph, which may be an ``If``/``Loop``/``Scan`` body: the slot
    inputs and constants live in the main graph and are visible there as outer-scope values.
    """
    graph = node.graph
    own = {id(n) for n in new_nodes}
    uses = [(u.node, u.idx) for u in old.uses() if id(u.node) not in own]
    graph.insert_after(node, new_nodes)
    for consumer, idx in uses:
        consumer.replace_input_with(idx, new)
    for i, out in enumerate(graph.outputs):
        if out is old:
            # Keep the graph's output names stable: the new value takes the old name.
            name = old.name
            old.name = f"{name}.lora_base"
            new.name = name
            graph.outputs[i] = new


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


def _finish(
    graph: ir.Graph,
    node: ir.Node,
    base: ir.Value,
    delta: ir.Value,
    nodes: list[ir.Node],
    dora: ir.Value | None,
    bias: ir.Value | None,
    channel_shape: np.ndarray | None,
    prefix: str,
) -> None:
    """y = base + delta, or for DoRA g ⊙ (base + delta) [+ bias]; then rewire the consumers of ``base``."""
    add = ir.node("Add", [base, delta], name=f"{prefix}/add")
    nodes.append(add)
    out = add.outputs[0]
    if dora is not None:
        g = _per_channel(graph, dora, channel_shape, prefix, "dora_shape", nodes)
        mul = ir.node("Mul", [out, g], name=f"{prefix}/dora_mul")
        nodes.append(mul)
        out = mul.outputs[0]
        if bias is not None:
            b = _per_channel(graph, bias, channel_shape, prefix, "bias_shape", nodes)
            bias_add = ir.node("Add", [out, b], name=f"{prefix}/bias_add")
            nodes.append(bias_add)
            out = bias_add.outputs[0]
    out.name = f"{prefix}/output"
    _rewire(node, base, out, nodes)


def _per_channel(
    graph: ir.Graph, vec: ir.Value, channel_shape: np.ndarray | None, prefix: str, what: str, nodes: list[ir.Node]
) -> ir.Value:
    """``vec`` (out,) reshaped to broadcast over the op's output channels (conv: (out, 1, ...))."""
    if channel_shape is None:
        return vec
    shape = _const(graph, f"{prefix}.channel_shape", channel_shape)
    reshape = ir.node("Reshape", [vec, shape], name=f"{prefix}/{what}")
    nodes.append(reshape)
    return reshape.outputs[0]


def _prefix(graph: ir.Graph, node: ir.Node, a: ir.Value) -> str:
    # Names derive from the slot's input names, so the same model always gets the same graph; a node in
    # a subgraph adds the path of the attributes holding it, since both If branches may use one node name.
    stem = a.name[: -len(".lora_A")] if a.name and a.name.endswith(".lora_A") else (a.name or "lora")
    scope = _scope(graph, node.graph) if node.graph is not graph else ""
    return f"{stem}/{scope}{node.name or node.op_type}"


def _scope(top: ir.Graph, sub: ir.Graph | None) -> str:
    """``If_0.then_branch/`` for a node in that subgraph ("" in the top graph)."""
    for n in top:
        for attr in n.attributes.values():
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else []
            if attr.type == ir.AttributeType.GRAPHS:
                graphs = list(attr.value)
            for i, g in enumerate(graphs):
                where = f"{n.name or n.op_type}.{attr.name}{'' if len(graphs) == 1 else i}/"
                if g is sub:
                    return where
                inner = _scope(g, sub)
                if inner:
                    return where + inner
    return ""


def matmul_branch(graph: ir.Graph, node: ir.Node, a: ir.Value, b: ir.Value, dora: ir.Value | None) -> None:
    """MatMul(x, W) → + MatMul(MatMul(x, A′), B′). A bias Add after the MatMul stays after DoRA's Mul."""
    prefix = _prefix(graph, node, a)
    x = node.inputs[0]
    h = ir.node("MatMul", [x, a], name=f"{prefix}/lora_A")
    d = ir.node("MatMul", [h.outputs[0], b], name=f"{prefix}/lora_B")
    _finish(graph, node, node.outputs[0], d.outputs[0], [h, d], dora, None, None, prefix)


def gemm_branch(graph: ir.Graph, node: ir.Node, a: ir.Value, b: ir.Value, dora: ir.Value | None) -> None:
    """Gemm(x, W, C) = α·xW + βC → + α·(xA′)B′; for DoRA, C moves out of the Gemm to after g's Mul."""
    prefix = _prefix(graph, node, a)
    x = node.inputs[0]
    h = ir.node("MatMul", [x, a], name=f"{prefix}/lora_A")
    d = ir.node("MatMul", [h.outputs[0], b], name=f"{prefix}/lora_B")
    nodes = [h, d]
    delta = d.outputs[0]
    alpha = _attr_float(node, "alpha", 1.0)
    dtype = a.dtype.numpy() if a.dtype is not None else np.float32
    if alpha != 1.0:
        mul = ir.node("Mul", [delta, _const(graph, f"{prefix}.alpha", np.array(alpha, dtype=dtype))])
        mul.name = f"{prefix}/alpha"
        nodes.append(mul)
        delta = mul.outputs[0]
    bias = None
    if dora is not None and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2]
        node.replace_input_with(2, None)
        beta = _attr_float(node, "beta", 1.0)
        if beta != 1.0:
            mul = ir.node("Mul", [bias, _const(graph, f"{prefix}.beta", np.array(beta, dtype=dtype))])
            mul.name = f"{prefix}/beta"
            nodes.append(mul)
            bias = mul.outputs[0]
    _finish(graph, node, node.outputs[0], delta, nodes, dora, bias, None, prefix)


def conv_branch(graph: ir.Graph, node: ir.Node, a: ir.Value, b: ir.Value, dora: ir.Value | None) -> None:
    """Conv(x, W, bias) → + Conv(Conv(x, A′; stride, pads), B′ 1×1; group=base group), as PEFT's forward.

    PEFT's lora_A conv takes the base kernel's size, stride and padding but neither its dilation nor its
    groups; lora_B is a 1×1 conv with the base's groups.
    """
    prefix = _prefix(graph, node, a)
    if any(d != 1 for d in (node.attributes["dilations"].as_ints() if "dilations" in node.attributes else ())):
        raise ModelError(f"{node.name}: LoRA on a dilated Conv is not supported (PEFT's lora_A has no dilation)")
    attrs: dict = {}
    for key in ("strides", "pads"):
        if key in node.attributes:
            attrs[key] = list(node.attributes[key].as_ints())
    if "auto_pad" in node.attributes:
        attrs["auto_pad"] = node.attributes["auto_pad"].as_string()
    x = node.inputs[0]
    h = ir.node("Conv", [x, a], attributes=attrs, name=f"{prefix}/lora_A")
    d = ir.node("Conv", [h.outputs[0], b], attributes={"group": _attr_int(node, "group", 1)}, name=f"{prefix}/lora_B")
    bias = None
    if dora is not None and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2]
        node.replace_input_with(2, None)
    spatial = len(a.shape) - 2 if a.shape is not None else 2
    channel = np.array([-1] + [1] * spatial, dtype=np.int64)
    _finish(graph, node, node.outputs[0], d.outputs[0], [h, d], dora, bias, channel, prefix)


def gather_branch(graph: ir.Graph, node: ir.Node, a: ir.Value, b: ir.Value, dora: ir.Value | None) -> None:
    """Gather(W, ids) → + MatMul(Gather(A′ (num, r), ids), B′ (r, dim))."""
    prefix = _prefix(graph, node, a)
    ids = node.inputs[1]
    h = ir.node("Gather", [a, ids], attributes={"axis": 0}, name=f"{prefix}/lora_A")
    d = ir.node("MatMul", [h.outputs[0], b], name=f"{prefix}/lora_B")
    _finish(graph, node, node.outputs[0], d.outputs[0], [h, d], dora, None, None, prefix)

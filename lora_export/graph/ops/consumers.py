"""Which nodes apply a target's weight, and giving them a private copy when the weight is shared.

One initializer can feed several nodes: a module called twice, tied weights (GPT-2's ``wte`` feeds
the embedding Gather and lm_head's ``Transpose``), or equal tensors an exporter deduplicated. A LoRA
target changes only *its* module's calls, so a merge must not change the other consumers: they keep
the original tensor and the target's nodes get their own merged copy.

A node belongs to a target when its names or scopes attribute it to the target's module; a node
with no attribution belongs to it only when no consumer is attributed to another module (else it is
ambiguous and refused, never guessed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from lora_export.errors import TargetError

from ..match.module_paths import node_module_paths, suffix_score
from .layouts import OpLayout, get_layout


@dataclass
class Consumers:
    """The nodes that apply a target (``own``) and every other use of its weight (``others``)."""

    own: list[ir.Node]
    others: list[str] = field(default_factory=list)  # short descriptions, for reports

    @property
    def shared(self) -> bool:
        return bool(self.others)


def belongs(node: ir.Node, module: str) -> bool | None:
    """True if the node's names/scopes attribute it to ``module``, False if to another module, None if unnamed."""
    paths = node_module_paths(node)
    if not paths:
        return None
    return any(suffix_score(module, p) for p in paths)


def _fits(node: ir.Node, layout: OpLayout, kind: str, shape: tuple[int, ...]) -> bool:
    return layout.kind == kind and layout.weight_shape(node) == tuple(shape)


def layout_users(value: ir.Value) -> list[tuple[ir.Node, OpLayout]]:
    """Nodes whose op layout reads ``value`` as its weight (directly or through a Transpose)."""
    out = []
    seen: set[int] = set()
    for use in value.uses():
        node = use.node
        nodes = [node]
        if node.op_type == "Transpose":
            nodes = [u.node for o in node.outputs for u in o.uses()]
        for n in nodes:
            layout = get_layout(n)
            if id(n) in seen or layout is None or layout.weight_value(n) is not value:
                continue
            seen.add(id(n))
            out.append((n, layout))
    return out


def consumers(
    value: ir.Value, module: str, kind: str, shape: tuple[int, ...], known_modules: set[str] | None = None
) -> Consumers:
    """Split the uses of ``value`` into the target's own nodes and the rest (see the module docstring).

    ``known_modules`` (the base model's module paths, when its weights are given): a node named for a
    module the model does not have is a renamed one, as good as unnamed.
    """
    fitting, named_other, unnamed = [], [], []
    for node, layout in layout_users(value):
        if not _fits(node, layout, kind, shape):
            continue
        who = belongs(node, module)
        if who is False and known_modules is not None and not _names_known(node, known_modules):
            who = None
        if who is None:
            unnamed.append(node)
        elif who:
            fitting.append(node)
        else:
            named_other.append(node)
    if unnamed and named_other:
        raise TargetError(
            f"{module}: its weight {value.name!r} is shared with {_describe(named_other[0])} and unnamed nodes "
            f"({_describe(unnamed[0])}); cannot tell which apply {module} (pass --base-weights, or merge before "
            "the exporter deduplicated weights)"
        )
    own = fitting + unnamed
    return Consumers(own, other_readers(value, own))


def _names_known(node: ir.Node, known_modules: set[str]) -> bool:
    return any(suffix_score(p, m) for p in node_module_paths(node) for m in known_modules)


def other_readers(value: ir.Value, own: list[ir.Node]) -> list[str]:
    """Every use of ``value`` but by ``own`` (or a Transpose feeding only them), described for reports."""
    own_ids = {id(n) for n in own}
    others = []
    for use in value.uses():
        node = use.node
        if id(node) in own_ids:
            continue
        if node.op_type == "Transpose" and all(id(u.node) in own_ids for o in node.outputs for u in o.uses()):
            continue
        others.append(_describe(node))
    if value.is_graph_output():
        others.append("a graph output")
    return others


def _describe(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def private_copy(model: ir.Model, value: ir.Value, nodes: list[ir.Node], name_hint: str) -> ir.Value:
    """Point ``nodes`` at a new initializer holding a copy of ``value``; every other use keeps ``value``.

    Nodes reading ``value`` through a Transpose get the copy through that Transpose when it feeds only
    them, else through a new Transpose of their own. Returns the new initializer (same dtype and layout).
    """
    graph = value.graph if value.graph is not None else model.graph
    name = free_name(model, name_hint)
    copy = ir.Value(name=name, type=value.type, shape=value.shape)
    copy.const_value = value.const_value  # replaced by the merged tensor right after
    graph.register_initializer(copy)
    node_ids = {id(n) for n in nodes}
    for node in nodes:
        for i, inp in enumerate(node.inputs):
            if inp is value:
                node.replace_input_with(i, copy)
                continue
            producer = inp.producer() if inp is not None else None
            if producer is None or producer.op_type != "Transpose" or producer.inputs[0] is not value:
                continue
            if all(id(u.node) in node_ids for o in producer.outputs for u in o.uses()):
                producer.replace_input_with(0, copy)
            else:
                perm = producer.attributes.get("perm")
                attrs = {"perm": list(perm.as_ints())} if perm is not None else {}
                t = ir.node("Transpose", [copy], attributes=attrs, name=f"{name}/Transpose")
                node.graph.insert_before(node, t)
                node.replace_input_with(i, t.outputs[0])
    return copy


def free_name(model: ir.Model, hint: str) -> str:
    """``hint``, or ``hint.1``, ``hint.2``... : a name no initializer, input or node output uses yet."""
    taken = set()
    for g in model.graphs():
        taken.update(g.initializers)
        taken.update(v.name for v in g.inputs if v.name)
        for node in g:
            taken.update(o.name for o in node.outputs if o.name)
    name, i = hint, 1
    while name in taken:
        name, i = f"{hint}.{i}", i + 1
    return name

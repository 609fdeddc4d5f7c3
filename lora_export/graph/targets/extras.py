"""Where an adapter's full replacement tensors (trained biases, ``modules_to_save``) go in a graph.

A full tensor replaces its module's parameter only. Exporters share tensors between modules: TorchScript
folds equal initializers (GPT-2's zero biases) into one and feeds the copies through ``Identity`` nodes;
tied weights feed two modules. Then the module's own readers get a private tensor and every other reader
keeps the original (``private``); readers that cannot be told apart are refused, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from lora_export.errors import TargetError

from ..match.module_paths import best_unique, weight_module
from ..ops.consumers import belongs, consumers
from ..ops.layouts import OpLayout


@dataclass
class ResolvedExtra:
    """Where one full replacement tensor (trained bias, ``modules_to_save``) goes in the graph."""

    key: str
    shape: tuple[int, ...]
    status: str  # "matched" | "absent" | "unmatched"
    strategy: str | None = None
    value: ir.Value | None = None  # what the module's nodes read (an initializer, or an Identity copy of one)
    # Set when the tensor is written through an op layout (an anonymous, transposed weight).
    node: ir.Node | None = None
    layout: OpLayout | None = None
    detail: str = ""
    found_shape: tuple[int, ...] | None = None
    # Unmatched only because nothing names it: the resolver may still prove it absent by value.
    unnamed: bool = False
    nodes: list[ir.Node] = field(default_factory=list)  # the module's own readers
    private: bool = False  # other readers share ``value``: the module's readers get their own tensor
    source: ir.Value | None = None  # the initializer behind ``value`` (its dtype and graph)

    def to_dict(self) -> dict:
        out = {
            "tensor": self.key,
            "shape": list(self.shape),
            "status": self.status,
            "strategy": self.strategy,
            "initializer": self.value.name if self.value is not None else None,
            "layout": self.layout.describe(self.node) if self.layout is not None else None,
            "detail": self.detail,
        }
        if self.private:
            out["private_copy"] = True
        if self.found_shape is not None:
            out["found_shape"] = list(self.found_shape)
        return out


# An exporter's optimizer folds away what it proves constant: an all-zero bias of a fresh head is gone.
_UNNAMED = (
    "no initializer or node names it (an exporter may have folded it away, as dynamo does an all-zero bias: "
    "export with lora-export export, which keeps it, or --torchscript)"
)


def named_tensors(model: ir.Model) -> dict[str, ir.Value]:
    """Initializers by name, plus ``Identity`` copies of initializers by their output name."""
    out: dict[str, ir.Value] = {}
    for g in model.graphs():
        out.update(g.initializers)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Identity" and node.inputs and node.outputs:
            src = node.inputs[0]
            if src is not None and src.const_value is not None and node.outputs[0].name:
                out.setdefault(node.outputs[0].name, node.outputs[0])
    return out


def resolve_extra(g, key: str, shape: tuple[int, ...]) -> ResolvedExtra:
    """Find the tensor a full replacement replaces: by name, else (weights) by its module's node scope.

    ``g`` is the resolver's graph index (``resolve._Graph``).
    """
    name, values, _ = best_unique(key, {n: [v] for n, v in g.named_tensors.items()})
    found = None
    owner = weight_module(key) or key.rpartition(".")[0]
    if name is not None:
        value = values[0]
        source = value if value.const_value is not None else value.producer().inputs[0]
        stored = tuple(int(d) for d in source.const_value.shape)
        if stored == shape:
            return _by_readers(key, shape, value, source, owner, f"initializer {name!r}")
        found = stored
    module = weight_module(key)
    if module is not None:
        for strategy, index in (("node-name", g.by_node_name), ("scope", g.by_scope)):
            mod, cands, _ = best_unique(module, index)
            for value in cands if mod is not None else []:
                for node, layout in g.uses(value):
                    if layout.weight_shape(node) == shape:
                        return _by_layout(key, shape, strategy, value, node, layout, module)
    if found is not None:
        why = f"initializer {name!r} has shape {found}, adapter tensor has {shape}"
        return ResolvedExtra(key, shape, "unmatched", detail=why, found_shape=found)
    # Names alone prove nothing (renamed modules): the resolver may still prove it absent by value.
    return ResolvedExtra(key, shape, "unmatched", detail=_UNNAMED, unnamed=True)


def _by_readers(key, shape, value: ir.Value, source: ir.Value, owner: str, why: str) -> ResolvedExtra:
    readers = [u.node for u in value.uses()]
    copies = [n for n in readers if n.op_type == "Identity"]  # the exporter's copies, for other modules
    named = {id(n): belongs(n, owner) for n in readers if n.op_type != "Identity"}
    own = [n for n in readers if named.get(id(n)) is True]
    foreign = [n for n in readers if named.get(id(n)) is False]
    unnamed = [n for n in readers if id(n) in named and named[id(n)] is None]
    if unnamed and (own or foreign):
        detail = f"{value.name!r} is read by {_who(foreign or own)} and unnamed nodes; cannot tell which are {owner}"
        return ResolvedExtra(key, shape, "unmatched", detail=detail)
    if len(unnamed) > 1 and not own:
        # ONNX Runtime's optimizer drops equal initializers but one (zero biases of every layer), and its fused
        # ops (BiasGelu, SkipLayerNormalization) carry no module names: which reader is the module's own?
        who = _who(unnamed)
        detail = f"{value.name!r} is read by {who}, which no name attributes to a module; cannot tell which are {owner}"
        return ResolvedExtra(key, shape, "unmatched", detail=detail)
    own = own or unnamed
    if not own:
        detail = f"{value.name!r} is read only by other modules' nodes ({_who(foreign or copies)})"
        return ResolvedExtra(key, shape, "unmatched", detail=detail)
    private = bool(foreign or copies) or value is not source or value.is_graph_output()
    return ResolvedExtra(
        key, shape, "matched", "initializer-name", value, detail=why, nodes=own, private=private, source=source
    )


def _by_layout(key, shape, strategy, value: ir.Value, node: ir.Node, layout: OpLayout, module: str) -> ResolvedExtra:
    try:
        c = consumers(value, module, layout.kind, shape)
    except TargetError as e:
        return ResolvedExtra(key, shape, "unmatched", detail=str(e))
    why = f"node {node.name!r} ({layout.describe(node)})"
    nodes = c.own or [node]
    return ResolvedExtra(
        key, shape, "matched", strategy, value, nodes[0], layout, why, nodes=nodes, private=c.shared, source=value
    )


def _who(nodes: list[ir.Node]) -> str:
    n = nodes[0]
    return f"{n.op_type} {n.name!r}" + (f" and {len(nodes) - 1} more" if len(nodes) > 1 else "")

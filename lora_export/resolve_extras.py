"""Where an adapter's full replacement tensors (trained biases, ``modules_to_save``) go in a graph."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from .consumers import belongs
from .layouts import OpLayout
from .module_paths import best_unique, suffix_score, weight_module


@dataclass
class ResolvedExtra:
    """Where one full replacement tensor (trained bias, ``modules_to_save``) goes in the graph."""

    key: str
    shape: tuple[int, ...]
    status: str  # "matched" | "absent" | "unmatched"
    strategy: str | None = None
    value: ir.Value | None = None
    # Set when the tensor is written through an op layout (an anonymous, transposed weight).
    node: ir.Node | None = None
    layout: OpLayout | None = None
    detail: str = ""
    found_shape: tuple[int, ...] | None = None
    # Unmatched only because nothing names it: the resolver may still prove it absent by value.
    unnamed: bool = False

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
        if self.found_shape is not None:
            out["found_shape"] = list(self.found_shape)
        return out


def resolve_extra(g, key: str, shape: tuple[int, ...]) -> ResolvedExtra:
    """Find the initializer a full tensor replaces: by name, else (weights) by its module's node scope.

    ``g`` is the resolver's graph index (``resolve._Graph``). A tensor also read by another module's
    nodes (tied weights) is refused: replacing it would change that module too.
    """
    name, values, _ = best_unique(key, {n: [v] for n, v in g.initializers.items()})
    found = None
    owner = weight_module(key) or key.rpartition(".")[0]
    if name is not None:
        value = values[0]
        stored = tuple(int(d) for d in value.const_value.shape)
        if stored == shape:
            shared = _foreign_reader(value, owner)
            if shared:
                return ResolvedExtra(key, shape, "unmatched", detail=shared)
            return ResolvedExtra(key, shape, "matched", "initializer-name", value, detail=f"initializer {name!r}")
        found = stored
    module = weight_module(key)
    if module is not None:
        for strategy, index in (("node-name", g.by_node_name), ("scope", g.by_scope)):
            mod, cands, _ = best_unique(module, index)
            for value in cands if mod is not None else []:
                for node, layout in g.uses(value):
                    if layout.weight_shape(node) == shape:
                        shared = _foreign_reader(value, module)
                        if shared:
                            return ResolvedExtra(key, shape, "unmatched", detail=shared)
                        why = f"node {node.name!r} ({layout.describe(node)})"
                        return ResolvedExtra(key, shape, "matched", strategy, value, node, layout, why)
    if found is not None:
        why = f"initializer {name!r} has shape {found}, adapter tensor has {shape}"
        return ResolvedExtra(key, shape, "unmatched", detail=why, found_shape=found)
    shared = _deduplicated(g, key)
    if shared:
        return ResolvedExtra(key, shape, "unmatched", detail=shared)
    # Names alone prove nothing (renamed modules): the resolver may still prove it absent by value.
    return ResolvedExtra(key, shape, "unmatched", detail="no initializer or node names it", unnamed=True)


def _foreign_reader(value: ir.Value, module: str) -> str:
    """Why ``value`` cannot be replaced for ``module`` alone: a node of another module reads it too."""
    for use in value.uses():
        node = use.node
        readers = [u.node for o in node.outputs for u in o.uses()] if node.op_type == "Transpose" else [node]
        for reader in readers:
            if belongs(reader, module) is False:
                return (
                    f"{value.name!r} is also read by {reader.op_type} {reader.name!r} (another module: tied "
                    "weights); replacing it would change that module too"
                )
    return ""


def _deduplicated(g, key: str) -> str:
    """Why a tensor named ``key`` cannot be replaced alone: TorchScript folds equal initializers into one
    and feeds the copies through Identity nodes, so replacing the source would change them all."""
    for node in ir.traversal.RecursiveGraphIterator(g.model.graph):
        if node.op_type != "Identity" or not node.outputs or suffix_score(key, node.outputs[0].name or "") == 0:
            continue
        src = node.inputs[0] if node.inputs else None
        if src is not None and src.const_value is not None:
            n = len(src.uses())
            return f"the exporter merged it with {n} equal tensor(s) into {src.name!r}; cannot replace it alone"
    return ""

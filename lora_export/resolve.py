"""Find the ONNX weight each LoRA target adapts: target resolution.

Strategies, tried in order for every target; each match must fit the target's kind (linear ↔
MatMul/Gemm, conv ↔ Conv, embedding ↔ Gather) and its canonical weight shape:

  manifest          ``metadata_props["lora_export.manifest"]`` written by our exporter
  initializer-name  ``<path>.weight`` initializers, tolerating wrapper prefixes on either side
  node-name         TorchScript node names (``/model/layers.0/q_proj/MatMul``) and the dynamo
                    exporter's ``pkg.torch.onnx.name_scopes`` / ``namespace`` node metadata
  fingerprint       an initializer equal to the user's base weight W (or Wᵀ)

A target whose module provably does not occur in the graph (no node scope or initializer name
mentions it) is "absent": it cannot change any output. One that occurs but cannot be matched is
"unmatched". Resolution reads metadata only, except fingerprinting, which samples tensor values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .adapter import Adapter, LoraTarget
from .layouts import OpLayout, get_layout
from .module_paths import (
    best_unique,
    mentions,
    name_module_paths,
    node_module_paths,
    scope_module_paths,
    suffix_score,
    weight_module,
)

MANIFEST_KEY = "lora_export.manifest"
STRATEGIES = ("manifest", "initializer-name", "node-name", "scope", "fingerprint")


@dataclass
class ResolvedTarget:
    """Where one LoRA target landed in the graph, and how it was found (or why not)."""

    target: LoraTarget
    status: str  # "matched" | "absent" | "unmatched"
    strategy: str | None = None
    value: ir.Value | None = None
    node: ir.Node | None = None
    layout: OpLayout | None = None
    nodes: list[ir.Node] = field(default_factory=list)
    detail: str = ""
    # A weight found by name whose shape does not fit the adapter (canonical layout), if any.
    found_shape: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        t = self.target
        out = {
            "target": t.name,
            "kind": t.kind,
            "rank": t.rank,
            "weight_shape": list(t.weight_shape),
            "status": self.status,
            "strategy": self.strategy,
            "initializer": self.value.name if self.value is not None else None,
            "node": self.node.name if self.node is not None else None,
            "op": self.node.op_type if self.node is not None else None,
            "layout": self.layout.describe(self.node) if self.layout is not None and self.node is not None else None,
            "shared_by": len(self.nodes),
            "detail": self.detail,
        }
        if self.found_shape is not None:
            out["found_shape"] = list(self.found_shape)
        return out


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


@dataclass
class Resolution:
    """The resolution of every target of an adapter, in adapter order, and of its extra tensors."""

    targets: list[ResolvedTarget]
    extras: list[ResolvedExtra] = field(default_factory=list)

    def _with(self, status: str) -> list[ResolvedTarget]:
        return [r for r in self.targets if r.status == status]

    @property
    def matched(self) -> list[ResolvedTarget]:
        return self._with("matched")

    @property
    def absent(self) -> list[ResolvedTarget]:
        return self._with("absent")

    @property
    def unmatched(self) -> list[ResolvedTarget]:
        return self._with("unmatched")

    def to_report(self) -> list[dict]:
        """A JSON-able list, one entry per target."""
        return [r.to_dict() for r in self.targets]


# -- candidates ----------------------------------------------------------------------------------


Candidate = tuple[ir.Node, OpLayout, ir.Value]


def _all_nodes(model: ir.Model) -> Iterable[ir.Node]:
    return ir.traversal.RecursiveGraphIterator(model.graph)


def candidate_weights(model: ir.Model) -> list[Candidate]:
    """Every (node, layout, initializer) a registered op layout can target, in graph order."""
    out = []
    for node in _all_nodes(model):
        layout = get_layout(node)
        if layout is None:
            continue
        value = layout.weight_value(node)
        if value is not None:
            out.append((node, layout, value))
    return out


# -- resolution ----------------------------------------------------------------------------------


class _Graph:
    """Indexes over a model, built once per resolution."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.candidates = candidate_weights(model)
        self.by_value: dict[int, list[tuple[ir.Node, OpLayout]]] = {}
        self.values: dict[int, ir.Value] = {}
        for node, layout, value in self.candidates:
            self.by_value.setdefault(id(value), []).append((node, layout))
            self.values[id(value)] = value
        self.nodes_by_name = {n.name: n for n in _all_nodes(model) if n.name}
        self.initializers: dict[str, ir.Value] = {}
        for g in model.graphs():
            self.initializers.update(g.initializers)
        # initializer module path → candidate values, for strategy (b)
        self.by_weight_name: dict[str, list[ir.Value]] = {}
        for value in self.values.values():
            mod = weight_module(value.name or "")
            if mod:
                self.by_weight_name.setdefault(mod, []).append(value)
        # node module path → candidate values, for strategy (c): TorchScript names, dynamo scopes
        self.by_node_name = self._index(name_module_paths)
        self.by_scope = self._index(scope_module_paths)
        self.all_module_paths = {p for n in _all_nodes(model) for p in node_module_paths(n)}
        self.all_weight_modules = {m for name in self.initializers if (m := weight_module(name))}

    def _index(self, paths_of: Callable[[ir.Node], list[str]]) -> dict[str, list[ir.Value]]:
        index: dict[str, list[ir.Value]] = {}
        for node, _layout, value in self.candidates:
            for p in paths_of(node):
                lst = index.setdefault(p, [])
                if all(v is not value for v in lst):
                    lst.append(value)
        return index

    def uses(self, value: ir.Value) -> list[tuple[ir.Node, OpLayout]]:
        return self.by_value.get(id(value), [])


def _fit(g: _Graph, t: LoraTarget, value: ir.Value) -> tuple[ir.Node | None, OpLayout | None, tuple | None]:
    """The first consumer whose layout fits the target's kind and shape: (node, layout, found_shape)."""
    found = None
    for node, layout in g.uses(value):
        if layout.kind != t.kind:
            continue
        shape = layout.weight_shape(node)
        if shape == t.weight_shape:
            return node, layout, None
        found = found or shape
    return None, None, found


def _matched(g: _Graph, t: LoraTarget, strategy: str, value: ir.Value, node: ir.Node, layout: OpLayout, why: str):
    nodes = [n for n, _ in g.uses(value)]
    return ResolvedTarget(t, "matched", strategy, value, node, layout, nodes, why)


def _by_manifest(g: _Graph, t: LoraTarget, manifest: Mapping[str, dict]):
    key, entries, _ = best_unique(t.name, {k: [v] for k, v in manifest.items()})
    if key is None:
        return None, None
    entry = entries[0] if isinstance(entries[0], dict) else {}
    value = g.initializers.get(entry.get("initializer", ""))
    node_name = entry.get("node")
    if node_name and node_name in g.nodes_by_name and value is None:
        node = g.nodes_by_name[node_name]
        layout = get_layout(node)
        value = layout.weight_value(node) if layout else None
    if value is None:
        return None, None
    node, layout, found = _fit(g, t, value)
    if node is None:
        return None, found
    return _matched(g, t, "manifest", value, node, layout, f"manifest entry {key!r} → {value.name}"), None


def _by_paths(g: _Graph, t: LoraTarget, index: Mapping[str, list[ir.Value]], strategy: str, what: str):
    key, values, why = best_unique(t.name, index)
    if key is None:
        return None, None, why
    fits, found = [], None
    for value in values:
        node, layout, shape = _fit(g, t, value)
        if node is not None:
            fits.append((value, node, layout))
        found = found or shape
    if len(fits) == 1:
        value, node, layout = fits[0]
        return _matched(g, t, strategy, value, node, layout, f"{what} {key!r} → {value.name}"), None, ""
    if len(fits) > 1:
        return None, None, f"{what} {key!r} holds {len(fits)} fitting weights"
    return None, found, f"{what} {key!r} has no weight of shape {t.weight_shape}"


def _by_fingerprint(g: _Graph, t: LoraTarget, base_weights: Mapping[str, np.ndarray]):
    keyed = {m: [k] for k in base_weights if (m := weight_module(k))}
    key, keys, _ = best_unique(t.name, keyed)
    if key is None:
        return None
    w = np.asarray(base_weights[keys[0]])
    if w.ndim < 2:
        return None
    hits = []
    for value in g.values.values():
        node, layout, _ = _fit(g, t, value)
        if node is not None and _same_tensor(value, w):
            hits.append((value, node, layout))
    if len(hits) != 1:
        return None
    value, node, layout = hits[0]
    return _matched(g, t, "fingerprint", value, node, layout, f"values equal base weight {keys[0]!r} → {value.name}")


def _same_tensor(value: ir.Value, w: np.ndarray) -> bool:
    """Whether the initializer holds W or Wᵀ: compare shapes, a few sampled entries, then everything."""
    shape = tuple(int(d) for d in value.const_value.shape)
    views = [v for v in (w, w.T if w.ndim == 2 else None) if v is not None and v.shape == shape]
    if not views:
        return False
    stored = value.const_value.numpy()
    rng = np.random.default_rng(0)
    idx = tuple(rng.integers(0, s, size=16) for s in shape)
    for v in views:
        cast = lambda a: np.asarray(a).astype(stored.dtype, copy=False)  # noqa: E731
        if np.array_equal(stored[idx], cast(v[idx])) and np.array_equal(stored, cast(v)):
            return True
    return False


def read_manifest(model: ir.Model) -> dict[str, dict]:
    """The ``modules`` map of our exporter's manifest, or {} when absent or unreadable."""
    raw = model.metadata_props.get(MANIFEST_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    mods = data.get("modules") if isinstance(data, dict) else None
    return mods if isinstance(mods, dict) else {}


def resolve_targets(
    model: ir.Model,
    adapter: Adapter,
    *,
    base_weights: Mapping[str, np.ndarray] | None = None,
) -> Resolution:
    """Find the weight each target of ``adapter`` adapts in ``model`` (see the module docstring)."""
    g = _Graph(model)
    manifest = read_manifest(model)
    results = []
    for t in adapter:
        results.append(_resolve_one(g, t, manifest, base_weights))
    extras = [_resolve_extra(g, key, tuple(np.shape(arr))) for key, arr in sorted(adapter.extra.items())]
    return Resolution(results, extras)


def _resolve_one(g: _Graph, t: LoraTarget, manifest, base_weights) -> ResolvedTarget:
    found_shape = None
    reasons = []
    if manifest:
        hit, found = _by_manifest(g, t, manifest)
        if hit:
            return hit
        found_shape = found_shape or found
    steps: list[tuple[str, Callable]] = [
        ("initializer-name", lambda: _by_paths(g, t, g.by_weight_name, "initializer-name", "initializer")),
        ("node-name", lambda: _by_paths(g, t, g.by_node_name, "node-name", "node name")),
        ("scope", lambda: _by_paths(g, t, g.by_scope, "scope", "node scope")),
    ]
    for _name, step in steps:
        hit, found, why = step()
        if hit:
            return hit
        found_shape = found_shape or found
        if why:
            reasons.append(why)
    if base_weights:
        hit = _by_fingerprint(g, t, base_weights)
        if hit:
            return hit
    if found_shape is not None:
        return ResolvedTarget(
            t,
            "unmatched",
            detail=f"found by name but its weight has shape {found_shape}, adapter expects {t.weight_shape}",
            found_shape=tuple(found_shape),
        )
    if _provably_absent(g, t, base_weights):
        return ResolvedTarget(
            t, "absent", detail="module does not occur in the graph (no node or initializer names it)"
        )
    detail = "; ".join(dict.fromkeys(reasons)) or "no strategy matched"
    if not base_weights:
        detail += " (pass --base-weights to match by value)"
    return ResolvedTarget(t, "unmatched", detail=detail)


def _provably_absent(g: _Graph, t: LoraTarget, base_weights) -> bool:
    # Without module names in the graph we cannot prove anything.
    if not g.all_module_paths and not g.all_weight_modules:
        return False
    if any(mentions(t.name, p) for p in g.all_module_paths):
        return False
    if any(suffix_score(t.name, m) for m in g.all_weight_modules):
        return False
    # Anonymous weights ("onnx::MatMul_12") may still be this module's: only absent if the graph names
    # every candidate's module some other way.
    return all(
        any(node_module_paths(n) for n, _ in g.uses(v)) or weight_module(v.name or "") for v in g.values.values()
    )


def _resolve_extra(g: _Graph, key: str, shape: tuple[int, ...]) -> ResolvedExtra:
    """Find the initializer a full tensor replaces: by name, else (weights) by its module's node scope."""
    name, values, _ = best_unique(key, {n: [v] for n, v in g.initializers.items()})
    found = None
    if name is not None:
        value = values[0]
        stored = tuple(int(d) for d in value.const_value.shape)
        if stored == shape:
            return ResolvedExtra(key, shape, "matched", "initializer-name", value, detail=f"initializer {name!r}")
        found = stored
    module = weight_module(key)
    if module is not None:
        for strategy, index in (("node-name", g.by_node_name), ("scope", g.by_scope)):
            mod, cands, _ = best_unique(module, index)
            for value in cands if mod is not None else []:
                for node, layout in g.uses(value):
                    if layout.weight_shape(node) == shape:
                        why = f"node {node.name!r} ({layout.describe(node)})"
                        return ResolvedExtra(key, shape, "matched", strategy, value, node, layout, why)
    if found is not None:
        why = f"initializer {name!r} has shape {found}, adapter tensor has {shape}"
        return ResolvedExtra(key, shape, "unmatched", detail=why, found_shape=found)
    shared = _deduplicated(g, key)
    if shared:
        return ResolvedExtra(key, shape, "unmatched", detail=shared)
    owner = module or key.rpartition(".")[0]
    if owner and g.all_module_paths and not any(mentions(owner, p) for p in g.all_module_paths):
        return ResolvedExtra(key, shape, "absent", detail="module does not occur in the graph")
    return ResolvedExtra(key, shape, "unmatched", detail="no initializer or node names it")


def _deduplicated(g: _Graph, key: str) -> str:
    """Why a tensor named ``key`` cannot be replaced alone: TorchScript folds equal initializers into one
    and feeds the copies through Identity nodes, so replacing the source would change them all."""
    for node in _all_nodes(g.model):
        if node.op_type != "Identity" or not node.outputs or suffix_score(key, node.outputs[0].name or "") == 0:
            continue
        src = node.inputs[0]
        if src is not None and src.const_value is not None:
            n = len(src.uses())
            return f"the exporter merged it with {n} equal tensor(s) into {src.name!r}; cannot replace it alone"
    return ""

"""Find the ONNX weight each LoRA target adapts: target resolution.

Strategies, tried in order for every target; each match must fit the target's kind (linear ↔
MatMul/Gemm, conv ↔ Conv, embedding ↔ Gather) and its canonical weight shape:

  manifest          ``metadata_props["lora_export.manifest"]`` written by our exporter
  initializer-name  ``<path>.weight`` initializers, tolerating wrapper prefixes on either side
  node-name         TorchScript node names (``/model/layers.0/q_proj/MatMul``)
  scope             the dynamo exporter's ``pkg.torch.onnx.name_scopes`` / ``namespace`` node metadata
  fingerprint       an initializer equal to the user's base weight W (or Wᵀ)
  packed            a slice of one packed MatMul/Gemm weight equal to W (or Wᵀ): fused Q/K/V (``packed``),
                    or of one quantized weight holding W up to its rounding (``packed_quant``)
  genai-name        the onnxruntime-genai builder's names, packed slices of proven widths (``targets/genai_names``)

With base weights, a match found by name must also hold the target's base weight by value. A graph
name that two targets could both claim (an encoder exported alone names ``layers.0.q_proj``, which
fits the adapter's encoder and decoder paths) is ambiguous: refused, never guessed.

A target is "absent" only with proof that no weight of the graph can be its module: its base weight
is not in the graph by value and every graph tensor that could hold it is accounted for by another
base weight (checked here with ``base_weights``, or by our exporter, which records it in the
manifest). Anything else not found is "unmatched": an error unless the caller allows partial merges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from lora_export import safejson
from lora_export.core.adapter import Adapter, LoraTarget
from lora_export.errors import TargetError

from ..match.module_paths import best_unique, name_module_paths, scope_module_paths, weight_module
from ..match.value_match import ValueIndex, base_key
from ..model.model_check import ensure_checked
from ..ops.consumers import consumers
from ..ops.layouts import OpLayout, get_layout
from ..ops.packed import packed_readers
from ..ops.packed_bias import place_packed_biases
from ..ops.packed_quant import the_packed_slice
from .absence import absent_or_why, extra_absent, quantized_holders
from .extras import named_tensors, resolve_extra
from .genai_names import STRATEGY as GENAI
from .genai_names import GenaiDims, by_genai_names, is_genai
from .resolved import Resolution, ResolvedTarget

MANIFEST_KEY = "lora_export.manifest"
STRATEGIES = ("manifest", "initializer-name", "node-name", "scope", GENAI, "fingerprint", "packed")


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
        self.initializers: dict[str, ir.Value] = {}
        for g in model.graphs():
            self.initializers.update(g.initializers)
        self.named_tensors = named_tensors(model)
        self.by_weight_name: dict[str, list[ir.Value]] = {}
        for value in self.values.values():
            mod = weight_module(value.name or "")
            if mod:
                self.by_weight_name.setdefault(mod, []).append(value)
        self.by_node_name = self._index(name_module_paths)
        self.by_scope = self._index(scope_module_paths)
        self.all_module_paths = set(self.by_node_name) | set(self.by_scope) | set(self.by_weight_name)
        self.ops = {n.op_type for n in _all_nodes(model)}
        self.bounds: dict[int, tuple | None] = {}  # quantized weights' value bounds, computed once
        self.genai: tuple[GenaiDims | None, dict[str, int]] | None = None  # builder naming: (dims, widths)

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


# -- strategies ----------------------------------------------------------------------------------


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


def _matched(t: LoraTarget, strategy: str, value: ir.Value, node: ir.Node, layout: OpLayout, why: str, key=None):
    return ResolvedTarget(t, "matched", strategy, value, node, layout, [node], why, key=key)


def _by_manifest(g: _Graph, t: LoraTarget, manifest: Mapping[str, dict]):
    key, entries, _ = best_unique(t.name, {k: [v] for k, v in manifest.items()})
    if key is None:
        return None, None
    entry = entries[0] if isinstance(entries[0], dict) else {}
    value = g.initializers.get(entry.get("initializer", ""))
    node_name = entry.get("node")
    if value is None and node_name:
        node = next((n for n, _, _ in g.candidates if n.name == node_name), None)
        layout = get_layout(node) if node is not None else None
        value = layout.weight_value(node) if layout else None
    if value is None:
        return None, None
    node, layout, found = _fit(g, t, value)
    if node is None:
        return None, found
    return _matched(t, "manifest", value, node, layout, f"manifest entry {key!r} → {value.name}", key), None


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
        return _matched(t, strategy, value, node, layout, f"{what} {key!r} → {value.name}", key), None, ""
    if len(fits) > 1:
        return None, None, f"{what} {key!r} holds {len(fits)} fitting weights"
    return None, found, f"{what} {key!r} has no weight of shape {t.weight_shape}"


def _by_fingerprint(g: _Graph, t: LoraTarget, w: np.ndarray, key: str):
    hits = []
    for value in g.values.values():
        node, layout, _ = _fit(g, t, value)
        if node is not None and layout.holds(node, w):
            hits.append((value, node, layout))
    if len(hits) != 1:
        return None
    value, node, layout = hits[0]
    return _matched(t, "fingerprint", value, node, layout, f"values equal base weight {key!r} → {value.name}")


def _by_packed(g: _Graph, t: LoraTarget, w: np.ndarray, key: str):
    """Exactly one slice of one packed weight holds W, and no other graph tensor does (see ``packed``)."""
    hit = the_packed_slice(g.model, g.candidates, t, w, g.bounds)
    if hit is None:
        return None
    node, layout, value = hit
    end = layout.offset + layout.width
    return _matched(t, "packed", value, node, layout, f"base weight {key!r} is {value.name}[{layout.offset}:{end}]")


def _by_genai(g: _Graph, t: LoraTarget):
    hit, found, why = by_genai_names(g, t, *g.genai)
    return (_matched(t, GENAI, *hit) if hit is not None else None), found, why


def read_manifest(model: ir.Model) -> dict[str, dict]:
    """The ``modules`` map of our exporter's manifest, or {} when absent or unreadable."""
    mods = _manifest(model).get("modules")
    return mods if isinstance(mods, dict) else {}


def _manifest(model: ir.Model) -> dict:
    """Our exporter's manifest, with only well-formed entries (``load_model`` refuses malformed ones; a
    model built in memory may still carry anything)."""
    raw = model.metadata_props.get(MANIFEST_KEY)
    if not raw:
        return {}
    try:
        data = safejson.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    mods = data.get("modules") if isinstance(data.get("modules"), dict) else {}
    absent = data.get("absent") if isinstance(data.get("absent"), list) else []
    return {
        "modules": {
            k: {f: v[f] for f in ("initializer", "node") if isinstance(v.get(f), str)}
            for k, v in mods.items()
            if isinstance(v, dict)
        },
        "absent": [m for m in absent if isinstance(m, str)],
    }


# -- resolution ----------------------------------------------------------------------------------


def resolve_targets(
    model: ir.Model,
    adapter: Adapter,
    *,
    base_weights: Mapping[str, np.ndarray] | None = None,
    genai_dims: GenaiDims | None = None,
) -> Resolution:
    """Find the weight each target of ``adapter`` adapts in ``model`` (see the module docstring);
    ``genai_dims``: the attention widths of the onnxruntime-genai config beside the model, if any."""
    ensure_checked(model)
    g = _Graph(model)
    if is_genai(model, genai_dims):
        g.genai = (genai_dims, {t.name: int(t.weight_shape[0]) for t in adapter})
    manifest = _manifest(model)
    modules = manifest.get("modules") if isinstance(manifest.get("modules"), dict) else {}
    proven_absent = manifest.get("absent", [])
    index = ValueIndex(model, base_weights, quantized_holders(model)) if base_weights else None
    results = [_resolve_one(g, t, modules, base_weights) for t in adapter]
    not_found = [r for r in results if r.status == "unmatched" and r.found_shape is None]
    known = {m for k in base_weights if (m := weight_module(k))} if base_weights else None
    for r in results:
        if r.status == "matched":
            _attach_consumers(r, known)
    _refuse_shared_claims(results, base_weights is not None)
    for r in not_found:
        absent_or_why(g, r, proven_absent, base_weights, index)
    extras = [resolve_extra(g, key, tuple(np.shape(arr))) for key, arr in sorted(adapter.extra.items())]
    place_packed_biases(results, extras, base_weights, index.tensors if index is not None else [])
    for e in extras:
        if e.unnamed and index is not None:
            extra_absent(e, base_weights, index)
    return Resolution(results, extras)


def _resolve_one(g: _Graph, t: LoraTarget, modules, base_weights) -> ResolvedTarget:
    found_shape = None
    reasons = []
    key = base_key(t.name, base_weights) if base_weights else None
    w = np.asarray(base_weights[key]) if key is not None else None
    steps: list[tuple[str, Callable]] = [
        ("initializer-name", lambda: _by_paths(g, t, g.by_weight_name, "initializer-name", "initializer")),
        ("node-name", lambda: _by_paths(g, t, g.by_node_name, "node-name", "node name")),
        ("scope", lambda: _by_paths(g, t, g.by_scope, "scope", "node scope")),
    ]
    if modules:
        steps.insert(0, ("manifest", lambda: (*_by_manifest(g, t, modules), "")))
    if g.genai is not None:
        steps.append((GENAI, lambda: _by_genai(g, t)))
    for name, step in steps:
        hit, found, why = step()
        if hit is not None and w is not None and not hit.layout.holds(hit.node, w):
            # The name fits but the values are another module's: never trust the name over the values.
            reasons.append(f"{name} match {hit.value.name!r} does not hold base weight {key!r}")
            continue
        if hit is not None:
            return hit
        found_shape = found_shape or found
        if why:
            reasons.append(why)
    if w is not None:
        hit = _by_fingerprint(g, t, w, key) or _by_packed(g, t, w, key)
        if hit is not None:
            return hit
    if found_shape is not None:
        return ResolvedTarget(
            t,
            "unmatched",
            detail=f"found by name but its weight has shape {found_shape}, adapter expects {t.weight_shape}",
            found_shape=tuple(found_shape),
        )
    return ResolvedTarget(t, "unmatched", detail="; ".join(dict.fromkeys(reasons)) or "no strategy matched")


def _attach_consumers(r: ResolvedTarget, known_modules: set[str] | None) -> None:
    """The nodes that apply the module, and the weight's other readers (or unmatched if ambiguous)."""
    if r.strategy in ("packed", GENAI):
        r.nodes, why = packed_readers(r.value)
        if why:
            r.status, r.detail = "unmatched", why
        return
    try:
        c = consumers(r.value, r.target.name, r.target.kind, r.target.weight_shape, known_modules)
    except TargetError as e:
        r.status, r.detail = "unmatched", str(e)
        return
    if not c.own:
        r.status, r.detail = "unmatched", f"{r.value.name!r} is read only by other modules' nodes"
        return
    r.nodes, r.shared_with = c.own, c.others
    if r.node not in c.own:
        r.node, r.layout = c.own[0], get_layout(c.own[0])


def _refuse_shared_claims(results: list[ResolvedTarget], by_value: bool) -> None:
    """Targets claiming the same node are ambiguous: a node applies one module, never two."""
    claims: dict[int, list[ResolvedTarget]] = {}
    for r in results:
        if r.status == "matched":
            for n in r.nodes:
                # Packed slices of one node are distinct modules; the same slice twice is not.
                claims.setdefault((id(n), getattr(r.layout, "offset", None)), []).append(r)
    for rs in claims.values():
        if len(rs) < 2:
            continue
        names = sorted({r.target.name for r in rs})
        node = rs[0].node
        hint = "" if by_value else "pass --base-weights to resolve by value, or "
        detail = (
            f"ambiguous: {node.op_type} {node.name or rs[0].value.name!r} ({rs[0].key or rs[0].value.name}) could be "
            f"any of {', '.join(names[:3])}; {hint}choose with --only-targets REGEX"
        )
        for r in rs:
            r.status, r.detail, r.nodes = "unmatched", detail, []

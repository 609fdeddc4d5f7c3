"""The LoRA target manifest our exporter embeds: each targetable torch module → the initializer holding it.

Exporters rename and re-layout weights (``fc.weight`` becomes a transposed ``val_3``), so the manifest is
built while the torch model is still in hand: by initializer name first, then by exact value. Modules
whose weight is provably not in the graph are recorded as absent (``resolve`` trusts that proof).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from ..graph.match.module_paths import node_module_paths
from ..graph.ops.layouts import OpLayout, get_layout
from ..training.layers import _hf_conv1d_type

MANIFEST_KEY = "lora_export.manifest"
MANIFEST_VERSION = 1


def targetable_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Modules LoRA can target, by path: (module, kind) for Linear, HF Conv1D, Conv1d/2d/3d, Embedding."""
    conv1d = _hf_conv1d_type()
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
            kind = "linear"
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = "conv"
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
        else:
            continue
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            out[name] = (module, kind)
    return out


def canonical_weight(module: nn.Module) -> np.ndarray:
    """The module's weight in ``LoraTarget.weight_shape`` layout, as float32 (HF Conv1D transposed)."""
    w = module.weight.detach().to("cpu")
    w = w.to(torch.float64) if w.dtype == torch.float64 else w.to(torch.float32)
    arr = w.numpy()
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        arr = arr.T
    return np.ascontiguousarray(arr)


@dataclass
class _Candidate:
    node: ir.Node
    layout: OpLayout
    value: ir.Value
    shape: tuple[int, ...]
    order: int
    digest: bytes | None = None


def weight_candidates(model: ir.Model) -> list[tuple[ir.Node, OpLayout, ir.Value]]:
    """(first consuming node, layout, initializer) for every weight a registered layout can read."""
    return [(c.node, c.layout, c.value) for c in _candidates(model)]


def _candidates(model: ir.Model) -> list[_Candidate]:
    seen: dict[int, _Candidate] = {}
    order = 0
    for graph in model.graphs():
        for node in graph:
            layout = get_layout(node)
            if layout is None:
                continue
            value = layout.weight_value(node)
            shape = layout.weight_shape(node) if value is not None else None
            # One entry per initializer: its first consumer in graph order names it in the manifest.
            if value is None or shape is None or id(value) in seen:
                continue
            seen[id(value)] = _Candidate(node, layout, value, tuple(shape), order)
            order += 1
    return list(seen.values())


def build_manifest(onnx_model: ir.Model, torch_model: nn.Module) -> tuple[dict, list[str]]:
    """Map each targetable module of ``torch_model`` to the initializer holding its exact weight.

    Tries the initializer named ``<module>.weight`` first, then the candidate whose canonical values
    equal the module's weight bit for bit. When several candidates carry identical values, the one
    whose node scope names the module wins, else the first unclaimed in graph order. Tied modules
    (one Parameter) may share an initializer. Returns (manifest, unmapped module paths).
    """
    candidates = _candidates(onnx_model)
    by_kind_shape: dict[tuple[str, tuple[int, ...]], list[_Candidate]] = {}
    for c in candidates:
        by_kind_shape.setdefault((c.layout.kind, c.shape), []).append(c)
    claimed: dict[int, int] = {}  # id(value) -> id(parameter) that claimed it
    modules: dict[str, dict] = {}
    unmapped: list[str] = []
    targetable = targetable_modules(torch_model)
    for name, (module, kind) in targetable.items():
        weight = canonical_weight(module)
        pool = by_kind_shape.get((kind, tuple(weight.shape)), [])
        match = _match(name, module.weight, weight, pool, claimed)
        if match is None:
            unmapped.append(name)
            continue
        claimed.setdefault(id(match.value), id(module.weight))
        modules[name] = {
            "initializer": match.value.name,
            "node": match.node.name,
            "op_type": match.node.op_type,
            "layout": match.layout.describe(match.node),
        }
    manifest = {"version": MANIFEST_VERSION, "modules": modules}
    absent = _proven_absent(onnx_model, torch_model, {n: targetable[n][0] for n in unmapped})
    if absent:
        manifest["absent"] = absent
    return manifest, unmapped


def _proven_absent(onnx_model: ir.Model, torch_model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """Unmapped modules whose weight is provably not in the graph (``resolve``'s rule, with the model's
    own state dict as the base weights): not in it by value, and every graph tensor accounted for."""
    if not modules:
        return []
    from ..graph.match.value_match import ValueIndex

    state = {}
    for k, v in torch_model.state_dict().items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            state[k] = v.detach().to("cpu", torch.float32).numpy()
    index = ValueIndex(onnx_model, state)
    out = []
    for name, module in modules.items():
        w = canonical_weight(module)
        if index.occurs(w) is None and not index.unaccounted_for(tuple(w.shape)):
            out.append(name)
    return sorted(out)


def _match(
    name: str, param: torch.Tensor, weight: np.ndarray, pool: list[_Candidate], claimed: dict[int, int]
) -> _Candidate | None:
    free = [c for c in pool if claimed.get(id(c.value), id(param)) == id(param)]
    for c in free:
        if c.value.name == f"{name}.weight" and _equal(c, weight):
            return c
    digest = _digest(weight)
    equal = [c for c in free if _candidate_digest(c) == digest and _equal(c, weight)]
    if len(equal) > 1:
        scoped = [c for c in equal if name in node_module_paths(c.node)]
        equal = scoped or equal
    return equal[0] if equal else None


def _candidate_digest(c: _Candidate) -> bytes:
    if c.digest is None:
        c.digest = _digest(c.layout.read(c.node))
    return c.digest


def _digest(arr: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).digest()


def _equal(c: _Candidate, weight: np.ndarray) -> bool:
    return bool(np.array_equal(c.layout.read(c.node), weight))

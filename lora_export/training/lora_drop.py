"""LoRA-drop (Zhou et al. 2024, arXiv 2402.07721): keep the LoRA of the modules whose output matters,
let the others share one LoRA.

1. ``attach_lora`` and a short warm-up on a data sample (the caller's training loop).
2. ``lora_importance(model, batches)``: per LoRA module, g = Σ‖ΔW·x‖² over the sample — the squared
   norm of its LoRA output s·B·A·x, summed over every position of every batch.
3. ``apply_lora_drop(model, importance, threshold)``: modules are grouped by type — the same path with
   the layer indices left out (``model.layers.*.self_attn.q_proj``), the same kind, shapes and scale — so
   a shared LoRA always fits its modules. Within a group, g is normalised to sum 1 and the modules are
   kept in decreasing order until the kept share reaches ``threshold`` (the paper's T, e.g. 0.9). The
   others (at least two) share one LoRA, freshly initialised (B = 0: their delta restarts at zero);
   kept modules keep their warmed-up LoRA. Build the optimizer after this step: the shared parameters
   are new.
4. Train on, then ``save_adapter``: the LoRA-drop format (``formats/lora_drop``), each shared LoRA once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, TargetError
from .attach import lora_layers
from .layers import SHARED_GROUP_ATTR, LoraLayer


@dataclass
class LoraDropPlan:
    """What ``apply_lora_drop`` did: kept modules, shared groups (name → members), normalised importance."""

    kept: list[str]
    shared: dict[str, list[str]]
    importance: dict[str, float] = field(default_factory=dict)


def lora_output(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The module's LoRA output s·B·A·x (no dropout), as its forward adds it."""
    if layer.kind == "linear":
        return F.linear(F.linear(x.to(layer.lora_A.dtype), layer.lora_A), layer.lora_B) * layer.scale
    if layer.kind == "conv":
        return layer._lora_branch(x.to(layer.lora_A.dtype)) * layer.scale
    out = (layer._embed(x, layer.lora_A.T) @ layer.lora_B.T) * layer.scale
    embed_scale = getattr(layer.base_layer, "embed_scale", None)
    return out if embed_scale is None else out * torch.as_tensor(embed_scale, dtype=out.dtype, device=out.device)


def lora_importance(
    model: nn.Module, batches: Iterable, forward: Callable[[nn.Module, object], object] | None = None
) -> dict[str, float]:
    """g = Σ‖s·B·A·x‖² per LoRA module over ``batches`` (no gradients, eval mode for the pass).

    A batch is passed as ``model(**batch)`` (a dict), ``model(*batch)`` (a tuple or list) or ``model(batch)``;
    ``forward(model, batch)`` overrides that.
    """
    layers = lora_layers(model)
    if not layers:
        raise TargetError("model has no LoRA layers (call attach_lora first)")
    totals = {name: 0.0 for name in layers}

    def hook(name: str):
        def record(module: LoraLayer, args: tuple, _output) -> None:
            out = lora_output(module, args[0]).detach().double()
            totals[name] += float(torch.sum(out * out))

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if forward is not None:
                    forward(model, batch)
                elif isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return totals


def select_kept(importance: Mapping[str, float], threshold: float) -> list[str]:
    """The most important names whose normalised importance first reaches ``threshold`` (ties by name)."""
    total = sum(importance.values())
    if total <= 0:
        return []
    kept, share = [], 0.0
    for name in sorted(importance, key=lambda n: (-importance[n], n)):
        if share >= threshold:
            break
        kept.append(name)
        share += importance[name] / total
    return kept


def module_type(path: str) -> str:
    """The module's type within the model: its path with the layer indices left out."""
    return ".".join(p for p in path.split(".") if not p.isdigit())


def _group_key(name: str, layer: LoraLayer) -> tuple:
    return (module_type(name), layer.kind, tuple(layer.lora_A.shape), tuple(layer.lora_B.shape), layer.scale)


def apply_lora_drop(model: nn.Module, importance: Mapping[str, float], threshold: float = 0.9) -> LoraDropPlan:
    """Keep each module group's most important LoRA (cumulative share ≥ ``threshold``); the rest share one."""
    if not 0.0 < float(threshold) <= 1.0:
        raise ConfigError(f"LoRA-drop threshold must be in (0, 1], got {threshold!r}")
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(importance))
    if missing:
        raise TargetError(f"no importance for LoRA module {missing[0]!r} (measure with lora_importance)")
    if any(m.lora_magnitude is not None for m in layers.values()):
        raise ConfigError("LoRA-drop with DoRA is not supported")
    if any(m.merged for m in layers.values()):
        raise TargetError("model has merged LoRA layers; unmerge them first")
    if sum(importance[n] for n in layers) <= 0:
        raise ConfigError("every LoRA output is zero on the sample: warm the LoRA up before measuring importance")
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(_group_key(name, layer), []).append(name)
    plan = LoraDropPlan(kept=[], shared={})
    used: set[str] = set()
    for key, members in groups.items():
        total = sum(importance[n] for n in members)
        plan.importance.update({n: (importance[n] / total if total > 0 else 0.0) for n in members})
        kept = select_kept({n: importance[n] for n in members}, threshold)
        rest = [n for n in members if n not in kept]
        if len(rest) < 2:  # nothing to share with: a lone module keeps its own LoRA
            plan.kept += sorted(kept + rest)
            continue
        group = _group_name(key[0], used)
        _share(group, [layers[n] for n in rest], getattr(model, "_lora_export_config", None))
        plan.kept += sorted(kept)
        plan.shared[group] = rest
    plan.kept.sort()
    return plan


def _group_name(module_type_: str, used: set[str]) -> str:
    base = "lora_drop." + re.sub(r"[^A-Za-z0-9_.\-]", "_", module_type_)
    name, i = base, 0
    while name in used:
        i += 1
        name = f"{base}.{i}"
    used.add(name)
    return name


def _share(group: str, layers: list[LoraLayer], config) -> None:
    """One fresh LoRA for ``layers``: the first one's parameters, re-initialised, assigned to all."""
    first = layers[0]
    first.reset_lora(getattr(config, "init", "default"))
    for layer in layers:
        layer.lora_A = first.lora_A
        layer.lora_B = first.lora_B
        setattr(layer, SHARED_GROUP_ATTR, group)

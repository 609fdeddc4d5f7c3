"""Attach LoRA to a torch model, freeze the rest, merge/unmerge, and save in PEFT's format.

Module paths are relative to the model passed to ``attach_lora`` — the same paths PEFT uses under
``base_model.model.``, so adapters move between the two unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.config import LoraConfig, closest_names
from ..core.vera import VeraConfig
from ..errors import ConfigError, ShapeError, TargetError
from ..formats.peft import save_adapter_files
from .layers import SHARED_GROUP_ATTR, LoraConv, LoraEmbedding, LoraLayer, LoraLinear, _hf_conv1d_type
from .vera import vera_layer, vera_projections, vera_record

_CONFIG_ATTR = "_lora_export_config"
# A training variant with its own adapter form (AdaLoRA): an object with ``finish_adapter(adapter) -> Adapter``
# (the canonical adapter of its layers) and ``save(model, directory, base) -> Path`` (its PEFT format).
VARIANT_ATTR = "_lora_export_variant"


def _wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    conv1d = _hf_conv1d_type()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return LoraLinear
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    return None


def _all_linear_names(model: nn.Module) -> list[str]:
    """PEFT's "all-linear": every Linear/Conv1D except the model's output head."""
    conv1d = _hf_conv1d_type()
    kinds = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and m is not head and n]


def _matches_module(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith(f".{p}") for p in patterns)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA wrappers in ``model`` by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by their path in the unwrapped model (``q.base_layer.bias`` → ``q.bias``); no LoRA tensors."""
    wrapped = lora_layers(model)
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner in wrapped:
            continue  # lora_A / lora_B / lora_magnitude
        if owner.endswith(".base_layer") and owner[: -len(".base_layer")] in wrapped:
            name = f"{owner[: -len('.base_layer')]}.{leaf}"
        elif owner == "base_layer" and "" in wrapped:
            name = leaf
        out[name] = p
    return out


def attach_lora(model: nn.Module, config_or_adapter: LoraConfig | Adapter, *, verbose: bool = True) -> nn.Module:
    """Wrap the target modules of ``model`` in place with LoRA layers and freeze everything else.

    With a ``LoraConfig`` the targets come from its patterns and the LoRA weights are freshly
    initialised; with an ``Adapter`` (from ``load_adapter``) its module paths, ranks, scales and weights
    are used, and its extra tensors (trained biases, modules_to_save) are copied in.
    A ``VeraConfig`` (or a VeRA adapter) attaches VeRA layers instead (``training.vera``).
    Returns ``model``; prints the trainable-parameter summary when ``verbose``.
    """
    if lora_layers(model):
        raise TargetError("model already has LoRA layers attached; call remove_lora first")
    adapter = config_or_adapter if isinstance(config_or_adapter, Adapter) else None
    config = adapter.config if adapter is not None else config_or_adapter
    if not isinstance(config, LoraConfig):
        raise TypeError(f"attach_lora needs a LoraConfig or an Adapter, got {type(config_or_adapter).__name__}")
    modules = dict(model.named_modules())
    names = [n for n in modules if n]

    if adapter is not None:
        missing = [t for t in adapter.targets if t not in modules]
        if missing:
            hint = closest_names(missing[0].rsplit(".", 1)[-1], names)
            raise TargetError(
                f"adapter {adapter.name!r}: module {missing[0]!r} not found in the model"
                + (f" (closest: {', '.join(hint)})" if hint else "")
            )
        targets = list(adapter.targets)
    else:
        resolved = config
        if config.target_modules == "all-linear":
            resolved = dataclasses.replace(config, target_modules=_all_linear_names(model))
        targets = [n for n in names if resolved.is_target(n)]
        if not targets:
            spec = config.target_modules
            query = spec if isinstance(spec, list) else [str(spec)]
            hint = closest_names(query, names)
            raise TargetError(
                f"target_modules {spec!r} matched no module" + (f"; closest names: {', '.join(hint)}" if hint else "")
            )

    shared = None
    if isinstance(config, VeraConfig):
        shared, adapter = vera_projections(modules, targets, config, adapter)
    for name in targets:
        module = modules[name]
        if shared is not None:
            layer = vera_layer(module, shared, config)
            layer.reset_lora(config.init)
            if adapter is not None:
                layer.load_vectors(adapter.vera.vectors[name], name)
            _set_module(model, name, layer)
            continue
        cls = _wrapper_for(module)
        if cls is None:
            raise TargetError(
                f"module {name!r} is a {type(module).__name__}; "
                "LoRA supports Linear, Conv1D, Conv1d/2d/3d and Embedding"
            )
        t = adapter.targets[name] if adapter is not None else None
        r = t.rank if t is not None else config.rank_for(name)
        scale = t.scale if t is not None else config.scale_for(name)
        use_dora = t.is_dora if t is not None else config.use_dora
        if cls is LoraConv:
            _check_conv(name, module, r, use_dora)
        layer = cls(module, r, scale, config.lora_dropout)
        if t is not None and t.kind != layer.kind:
            raise ShapeError(f"{name}: adapter holds {t.kind} LoRA but the module is a {type(module).__name__}")
        layer.reset_lora(config.init)
        if use_dora:
            layer.init_dora()
        if t is not None:
            layer.load_target(t, name)
        _set_module(model, name, layer)

    if adapter is not None:
        _tie_shared(model, adapter)
    mts = config.modules_to_save or []
    if mts and not any(_matches_module(n, mts) for n in names):
        raise TargetError(f"modules_to_save {mts!r} matched no module; closest: {', '.join(closest_names(mts, names))}")
    if adapter is not None and adapter.extra:
        _load_extra(model, adapter)
    _mark_trainable(model, config)
    setattr(model, _CONFIG_ATTR, config)
    if verbose:
        s = lora_summary(model)
        print(
            f"trainable params: {s['trainable']:,d} || all params: {s['total']:,d} || "
            f"trainable%: {s['trainable_percent']:.4f}"
        )
    return model


def _tie_shared(model: nn.Module, adapter: Adapter) -> None:
    """Members of a shared group (LoRA-drop) train one LoRA again: the first member's parameters."""
    for group, members in adapter.shared.items():
        first = model.get_submodule(members[0])
        for m in members:
            layer = model.get_submodule(m)
            layer.lora_A, layer.lora_B = first.lora_A, first.lora_B
            setattr(layer, SHARED_GROUP_ATTR, group)


def _shared_groups(layers: dict[str, LoraLayer]) -> dict[str, tuple[str, ...]]:
    """Groups of layers holding the very same lora_A and lora_B parameters, by group name."""
    by_pair: dict[tuple[int, int], list[str]] = {}
    for name, m in layers.items():
        # Only stored parameters can be shared; VeRA computes lora_A/B afresh, and a freed temporary's id
        # may be reused by the next layer's.
        if isinstance(m.lora_A, nn.Parameter) and isinstance(m.lora_B, nn.Parameter):
            by_pair.setdefault((id(m.lora_A), id(m.lora_B)), []).append(name)
    groups = [ms for ms in by_pair.values() if len(ms) > 1]
    a_ids = [id(layers[n].lora_A) for ms in by_pair.values() for n in ms[:1]]
    b_ids = [id(layers[n].lora_B) for ms in by_pair.values() for n in ms[:1]]
    if len(set(a_ids)) != len(a_ids) or len(set(b_ids)) != len(b_ids):
        raise TargetError("LoRA layers share lora_A but not lora_B (or the reverse): no adapter format holds that")
    out: dict[str, tuple[str, ...]] = {}
    for ms in groups:
        names = {getattr(layers[n], SHARED_GROUP_ATTR, None) for n in ms}
        group = names.pop() if len(names) == 1 and None not in names else f"shared.{ms[0]}"
        if group in out:
            raise TargetError(f"two groups of shared LoRA layers are both named {group!r}")
        out[group] = tuple(ms)
    return out


def _check_conv(name: str, module: nn.Module, r: int, use_dora: bool) -> None:
    if r % module.groups != 0:
        raise TargetError(f"{name}: rank {r} is not divisible by the convolution's groups={module.groups}")
    if use_dora and module.groups != 1:
        raise TargetError(f"{name}: DoRA on a grouped convolution (groups={module.groups}) is not supported")
    if any(d != 1 for d in module.dilation):
        # PEFT's A conv copies kernel/stride/padding but not dilation, so its output would not line up.
        raise TargetError(f"{name}: LoRA on a dilated convolution is not supported")
    if module.padding_mode != "zeros":
        raise TargetError(f"{name}: LoRA on a convolution with padding_mode={module.padding_mode!r} is not supported")


def _load_extra(model: nn.Module, adapter: Adapter) -> None:
    params = _plain_parameters(model)
    for key, arr in adapter.extra.items():
        p = params.get(key)
        if p is None:
            hint = closest_names(key, params)
            raise TargetError(
                f"adapter {adapter.name!r}: tensor {key!r} has no matching model parameter"
                + (f" (closest: {', '.join(hint)})" if hint else "")
            )
        if tuple(p.shape) != tuple(arr.shape):
            raise ShapeError(f"{key}: adapter tensor has shape {tuple(arr.shape)}, the model needs {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(p.dtype))


def _extra_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Plain paths of the non-LoRA parameters this adapter trains and saves (PEFT's rules)."""
    params = _plain_parameters(model)
    wrapped = lora_layers(model)
    mts = config.modules_to_save or []
    out = []
    for name in params:
        owner, _, leaf = name.rpartition(".")
        parts = owner.split(".") if owner else []
        in_mts = any(_matches_module(".".join(parts[: i + 1]), mts) for i in range(len(parts)))
        is_bias = leaf == "bias"
        if (
            in_mts
            or (config.bias == "all" and is_bias)
            or (config.bias == "lora_only" and is_bias and owner in wrapped)
        ):
            out.append(name)
    return out


def _mark_trainable(model: nn.Module, config: LoraConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        for p in layer.trainable_parameters():
            p.requires_grad_(True)
    params = _plain_parameters(model)
    for name in _extra_names(model, config):
        params[name].requires_grad_(True)


def lora_summary(model: nn.Module) -> dict:
    """Counts of trainable and total parameters, and the LoRA layers, of a model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    layers = lora_layers(model)
    return {
        "trainable": trainable,
        "total": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "lora_layers": len(layers),
        "ranks": sorted({m.r for m in layers.values()}),
        "dora": any(m.lora_magnitude is not None for m in layers.values()),
    }


def _require_lora(model: nn.Module) -> dict[str, LoraLayer]:
    layers = lora_layers(model)
    if not layers:
        raise TargetError("model has no LoRA layers (call attach_lora first)")
    return layers


# Set on a model whose base weights moved under training (Delta-LoRA): its LoRA alone is not its adapter.
MOVED_BASE_ATTR = "_lora_export_moved_base"


def adapter_from_model(model: nn.Module, name: str = "adapter") -> Adapter:
    """The canonical Adapter of a LoRA-wrapped model: A, B, scale, magnitude per target and the extra
    tensors (trained biases, modules_to_save) by their path in the unwrapped model."""
    moved = getattr(model, MOVED_BASE_ATTR, None)
    if moved:
        raise TargetError(f"the model's base weights moved during training ({moved}); save it with {moved}.save(dir)")
    return collect_adapter(model, name)


def collect_adapter(model: nn.Module, name: str = "adapter") -> Adapter:
    """``adapter_from_model`` without its check that the base weights are the original ones."""
    layers = _require_lora(model)
    if any(m.merged for m in layers.values()):
        raise TargetError("model has merged LoRA layers; call unmerge_lora before exporting the adapter")
    config = getattr(model, _CONFIG_ATTR, None) or LoraConfig(r=next(iter(layers.values())).r)
    # A layer may compile to no target at all (AdaLoRA pruned to rank 0): it changes nothing.
    targets = {n: t for n, m in layers.items() if (t := m.to_target(n)) is not None}
    if not targets:
        raise TargetError("every LoRA layer was pruned to rank 0: the adapter would not change the model")
    shared = _shared_groups({n: layers[n] for n in targets})
    for members in shared.values():
        first = targets[members[0]]  # one array for the whole group, as in the model
        targets.update({m: dataclasses.replace(targets[m], A=first.A, B=first.B) for m in members})
    if any(t.fan_in_fan_out for t in targets.values()) and not config.fan_in_fan_out:
        config = dataclasses.replace(config, fan_in_fan_out=True)
    if any(t.is_dora for t in targets.values()) and not config.use_dora:
        config = dataclasses.replace(config, use_dora=True)
    params = _plain_parameters(model)
    extra = {k: params[k].detach().to("cpu", torch.float32).numpy().copy() for k in _extra_names(model, config)}
    vera = vera_record(layers, config) if isinstance(config, VeraConfig) else None
    adapter = Adapter(targets=targets, config=config, extra=extra, name=name, vera=vera, shared=shared)
    variant = getattr(model, VARIANT_ATTR, None)
    return adapter if variant is None else variant.finish_adapter(adapter)


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | os.PathLike | None = None
) -> Path:
    """Write the model's adapter in PEFT's format (``PeftModel.from_pretrained`` loads it); a model whose
    LoRA layers share parameters (LoRA-drop) in the LoRA-drop format (``formats/lora_drop``).

    ``base_model_name_or_path`` (a hub id or a local path) goes into adapter_config.json, where
    ``PeftModel.from_pretrained`` and ``AutoPeftModel*`` look for the base model; by default it is the
    model's own ``name_or_path`` (a transformers model's), as PEFT records it, else null.
    """
    base = base_model_name_or_path
    if base is None:
        own = model.__dict__.get("name_or_path")  # what PEFT's get_peft_model records
        base = own if isinstance(own, str) and own else None
    if isinstance(base, os.PathLike):
        base = os.fspath(base)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"base_model_name_or_path must be a string or a path, not {type(base).__name__}")
    variant = getattr(model, VARIANT_ATTR, None)
    if variant is not None:
        return variant.save(model, directory, base)
    adapter = adapter_from_model(model, name=Path(directory).name)
    adapter.base_fingerprint = base_fingerprint(model, adapter)
    if adapter.shared:  # PEFT's format cannot hold one LoRA for several modules: the LoRA-drop format can
        from ..formats.lora_drop import save_lora_drop_files

        return save_lora_drop_files(adapter, directory, base)
    return save_adapter_files(adapter, directory, base)


def base_fingerprint(model: nn.Module, adapter: Adapter) -> dict[str, dict]:
    """The fingerprint of the base weights under ``adapter``'s targets (see ``lora_export.core.fingerprint``), in
    ΔW's layout: what merge, inject, convert and LoraSession compare the ONNX weights with."""
    from ..core.fingerprint import weight_entry

    layers = lora_layers(model)
    out = {}
    for name, target in adapter.targets.items():
        weight = layers[name].base_layer.weight.detach()
        dtype = str(weight.dtype).removeprefix("torch.")
        w = weight.to("cpu", torch.float32).numpy()
        out[name] = weight_entry(w.T if target.fan_in_fan_out else w, dtype=dtype)  # HF Conv1D: (in, out)
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight (float32 math, one rounding); outputs stay the same."""
    for name, layer in _require_lora(model).items():
        layer.merge(name)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``: subtract the folded deltas again."""
    for layer in _require_lora(model).values():
        layer.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace each LoRA wrapper by its base module, merging the adapter first unless ``merge=False``."""
    for name, layer in _require_lora(model).items():
        if merge:
            layer.merge(name)
        elif layer.merged:
            layer.unmerge()
        if name:
            _set_module(model, name, layer.base_layer)
    for attr in (_CONFIG_ATTR, VARIANT_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


unwrap = remove_lora

"""PiSSA / OLoRA / CorDA / LoRA-GA adapters converted to plain LoRA for the untouched base (PEFT's recipe).

These initialisations start from A₀, B₀ taken from the base weight and subtract them from it: training
runs on the residual base W − s·B₀A₀, and the trained A, B only fit that base. With the initial adapter
(saved right after initialisation, before training) the change is plain LoRA on W itself:

    ΔW = s·(B·A − B₀·A₀) = s·[B, −B₀]·[A; A₀]      (rank 2r, the same scale s)

as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` computes it. The converted
config doubles r, the rank_pattern and α (α·√2 with rsLoRA, so α/√r holds too) and the alpha_pattern
(×2, ×√2 with rsLoRA, where PEFT refuses the combination), and resets init_lora_weights to true. A DoRA
magnitude carries over unchanged: DoRA normalises W_res + s·B·A, which is exactly W + ΔW (PEFT's
conversion drops it, and such a PEFT-converted DoRA adapter is refused on loading).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from ..core.adapter import Adapter
from ..core.config import LoraConfig, base_mutating_init
from ..errors import AdapterError, ConfigError
from ..files.atomic import refuse_overwrite
from ..files.inject_folder import refuse_blocked_outputs
from ..files.publish import publish_folder, stage_parent
from ..files.staging import staging_dir
from .peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_files,
    adapter_from_state_dict,
    read_adapter_raw,
    save_adapter_files,
)


def _read(path: str | os.PathLike, what: str) -> tuple[Adapter, str | None, str | None]:
    """An adapter whose init may have rewritten the base, parsed as plain LoRA; that init (or None); the
    base model it records."""
    found: dict[str, object] = {}

    def check(raw: object) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{what}: adapter_config.json must hold a JSON object")
        peft_type = raw.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise ConfigError(f"{what}: a {peft_type} adapter; only LoRA adapters are converted")
        found["init"] = base_mutating_init(raw.get("init_lora_weights"))
        base = raw.get("base_model_name_or_path")
        found["base"] = base if isinstance(base, str) else None
        found["config"] = LoraConfig.from_peft_dict({**raw, "init_lora_weights": True})

    _, tensors, name = read_adapter_raw(path, check_config=check)
    return adapter_from_state_dict(tensors, found["config"], name=name), found["init"], found["base"]


def converted_config(config: LoraConfig) -> LoraConfig:
    """PEFT's converted config: rank 2r everywhere, α scaled so every module keeps its scale."""
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    return dataclasses.replace(
        config,
        r=2 * config.r,
        lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
        init="default",
    )


def convert_mutated_init(trained: Adapter, initial: Adapter) -> Adapter:
    """The trained adapter as plain LoRA on the untouched base: A′ = [A; A₀], B′ = [B, −B₀] per target."""
    if set(trained.targets) != set(initial.targets):
        only = sorted(set(trained.targets) ^ set(initial.targets))
        raise AdapterError(f"the initial adapter does not match the trained one: {only[0]} is in one of them only")
    config = converted_config(trained.config)
    targets = {}
    for name, t in trained.targets.items():
        t0 = initial.targets[name]
        if (t0.kind, t0.A.shape, t0.B.shape, t0.fan_in_fan_out) != (t.kind, t.A.shape, t.B.shape, t.fan_in_fan_out):
            raise AdapterError(f"{name}: the initial adapter's LoRA has another shape or layout than the trained one")
        if t0.scale != t.scale:
            raise AdapterError(f"{name}: the initial adapter's scale {t0.scale:g} differs from the trained {t.scale:g}")
        for what, tgt in (("trained", t), ("initial", t0)):
            for part, arr in (("lora_A", tgt.A), ("lora_B", tgt.B), ("magnitude", tgt.magnitude)):
                # NaN/Inf would pass straight into the converted adapter and every output it touches.
                if arr is not None and not np.isfinite(np.asarray(arr, dtype=np.float64)).all():
                    raise AdapterError(f"{name}: the {what} adapter's {part} holds NaN or Inf; nothing to convert")
        if t.kind == "conv" and t.groups != 1:
            raise AdapterError(f"{name}: LoRA on a grouped convolution cannot be converted (its B is per group)")
        # Concatenation and negation are exact: no rounding anywhere.
        a = np.concatenate([t.A, t0.A], axis=0)
        b = np.concatenate([t.B, -t0.B], axis=1)
        targets[name] = dataclasses.replace(t, A=a, B=b)
        scale = config.scale_for(name)
        if not math.isclose(scale, t.scale, rel_tol=1e-12):
            raise AdapterError(f"{name}: the converted config would give scale {scale:g} instead of {t.scale:g}")
    # The trained adapter's base (a PiSSA residual, say) is not the untouched base: no fingerprint carries over.
    return dataclasses.replace(trained, targets=targets, config=config, base_fingerprint=None)


def convert_init_adapter(
    trained_path: str | os.PathLike, initial_path: str | os.PathLike, out_dir: str | os.PathLike
) -> dict:
    """``lora-export convert-init``: write the converted adapter (PEFT's format) to ``out_dir``.

    Files of an existing ``out_dir`` other than the adapter's two are kept; the folder is swapped in whole.
    """
    trained, init_kind, base = _read(trained_path, "the trained adapter")
    initial, initial_kind, _ = _read(initial_path, "the initial adapter")
    if init_kind is None:
        raise ConfigError(
            f"{trained_path}: init_lora_weights is not PiSSA/OLoRA/CorDA/LoRA-GA: the adapter fits the untouched "
            "base already; nothing to convert"
        )
    if initial_kind not in (None, init_kind):
        raise ConfigError(f"the initial adapter was made by {initial_kind}, the trained one by {init_kind}")
    converted = convert_mutated_init(trained, initial)
    for key, arr in converted.extra.items():
        arr = np.asarray(arr)
        if arr.dtype.kind in "fcV" and not np.isfinite(arr.astype(np.float64)).all():
            raise AdapterError(f"{trained_path}: tensor {key} holds NaN or Inf; nothing to convert")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AdapterError(f"{out_dir} exists and is not a directory")
    outputs = [out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME]
    # Like every output: a new path or a regular file, never a folder, FIFO or device of that name.
    refuse_blocked_outputs(outputs)
    refuse_overwrite(outputs, [*adapter_files(trained_path), *adapter_files(initial_path)])
    dest = Path(os.path.realpath(out_dir)) if out_dir.is_symlink() else out_dir
    with staging_dir(stage_parent(dest)) as stage:
        new = stage / "out"
        save_adapter_files(converted, new, base)
        publish_folder(new, dest, stage, replaced={p.name for p in outputs}, last=CONFIG_NAME)
    return {
        "adapter": trained.name,
        "init": init_kind,
        "output": str(out_dir),
        "targets": len(converted.targets),
        "ranks": sorted({t.rank for t in converted.targets.values()}),
    }

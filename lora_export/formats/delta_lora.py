"""Delta-LoRA adapters (Zi et al. 2023, arXiv 2309.02411) on disk, and their canonical rank-2r form.

Delta-LoRA also moves the base weight after a warm-up of K steps: each step W += λ·(B_{t+1}A_{t+1} − B_tA_t).
The updates telescope, so the trained weight is W₀ + λ·(B_T A_T − B_K A_K) and the deployed one adds the
LoRA path s·B_T A_T. Keeping the step-K snapshot (A_K, B_K) makes the whole change a rank ≤ 2r adapter on
the untouched base: A″ = [A_T; A_K], B″ = [(s + λ)·B_T, −λ·B_K], scale 1 — no full-size weight file.

``adapter_config.json``: PEFT's LoRA config with ``"peft_type": "DELTA_LORA"``, ``"delta_update_ratio"``
(λ), ``"delta_start_step"`` (K) and ``"delta_steps"`` (T, informative). ``adapter_model.safetensors``: the
final A_T, B_T under PEFT's keys, and the snapshot under the same keys prefixed with ``delta_start.``;
without a snapshot (training stopped before K) the adapter is plain LoRA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.adapter import Adapter, LoraTarget
from ..core.config import LoraConfig
from ..errors import AdapterError, ConfigError
from ..files.atomic import atomic_write_text
from ..safejson import short_repr
from .peft import CONFIG_NAME, WEIGHTS_NAME, adapter_from_state_dict, adapter_state_dict
from .safetensors import write_safetensors

PEFT_TYPE = "DELTA_LORA"
START_PREFIX = "delta_start."
_OWN_KEYS = ("delta_update_ratio", "delta_start_step", "delta_steps")


def compile_delta_lora(final: Adapter, start: Adapter | None, update_ratio: float) -> Adapter:
    """The canonical adapter of a Delta-LoRA run: per module ΔW = λ·(B_T A_T − B_K A_K) + s·B_T A_T.

    ``final`` holds A_T, B_T and s; ``start`` the step-K snapshot (None: W never moved, plain LoRA).
    Each target becomes rank 2r with scale 1; B″ is computed in float64 and rounded once to float32.
    """
    if start is None:
        return final
    if set(start.targets) != set(final.targets):
        raise AdapterError(f"adapter {final.name!r}: the Delta-LoRA snapshot covers other modules than the adapter")
    lam = float(update_ratio)
    targets: dict[str, LoraTarget] = {}
    for name, t in final.targets.items():
        k = start.targets[name]
        if t.is_dora or k.is_dora:
            raise AdapterError(f"adapter {final.name!r}: {name}: Delta-LoRA with DoRA is not supported")
        if (k.kind, k.A.shape, k.B.shape) != (t.kind, t.A.shape, t.B.shape) or t.groups != 1:
            raise AdapterError(f"adapter {final.name!r}: {name}: the Delta-LoRA snapshot does not fit its LoRA")
        b_final = np.asarray(t.B, np.float64) * (float(t.scale) + lam)
        b_start = np.asarray(k.B, np.float64) * -lam
        a = np.concatenate([np.asarray(t.A, np.float32), np.asarray(k.A, np.float32)], axis=0)
        b = np.concatenate([b_final, b_start], axis=1).astype(np.float32)
        targets[name] = dataclasses.replace(t, A=a, B=b, scale=1.0)
    return dataclasses.replace(final, targets=targets, config=_unit_scale_config(final.config))


def _unit_scale_config(config: LoraConfig) -> LoraConfig:
    """The config of the compiled adapter: every rank doubled and α = rank, so each scale is 1."""
    rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    return dataclasses.replace(
        config,
        r=2 * config.r,
        lora_alpha=float(2 * config.r),
        rank_pattern=rank_pattern,
        alpha_pattern={k: float(v) for k, v in rank_pattern.items()},  # same keys, same order: same match
        use_rslora=False,
        lora_dropout=0.0,
    )


def _settings(config: dict[str, Any]) -> tuple[float, int]:
    lam, k = config.get("delta_update_ratio"), config.get("delta_start_step")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"Delta-LoRA adapter_config.json: delta_update_ratio must be a number, not {short_repr(lam)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"Delta-LoRA adapter_config.json: delta_start_step must be an integer >= 0: {short_repr(k)}")
    return float(lam), k


def load_delta_lora(config: dict[str, Any], tensors: dict[str, np.ndarray], name: str) -> Adapter:
    """The canonical (rank ≤ 2r) adapter of a Delta-LoRA file."""
    lam, _ = _settings(config)
    lora_config = LoraConfig.from_peft_dict(
        {**{k: v for k, v in config.items() if k not in _OWN_KEYS}, "peft_type": "LORA"}
    )
    if lora_config.use_dora:
        raise ConfigError(f"adapter {name!r}: Delta-LoRA with DoRA is not supported")
    final = {k: v for k, v in tensors.items() if not k.startswith(START_PREFIX)}
    snap = {k[len(START_PREFIX) :]: v for k, v in tensors.items() if k.startswith(START_PREFIX)}
    adapter = adapter_from_state_dict(final, lora_config, name=name)
    start = adapter_from_state_dict(snap, lora_config, name=name) if snap else None
    if start is not None and (start.extra or start.stored_base):
        raise AdapterError(f"adapter {name!r}: the Delta-LoRA snapshot holds tensors other than LoRA")
    return compile_delta_lora(adapter, start, lam)


def save_delta_lora_files(
    final: Adapter,
    start: Adapter | None,
    directory: str | os.PathLike,
    *,
    update_ratio: float,
    start_step: int,
    steps: int,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a Delta-LoRA run: A_T, B_T (``final``), the step-K snapshot (``start``), λ and K."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(final)
    if start is not None:
        tensors.update({START_PREFIX + k: v for k, v in adapter_state_dict(start).items()})
    write_safetensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    cfg = final.config.to_peft_dict(base_model_name_or_path)
    cfg.update(peft_type=PEFT_TYPE, delta_update_ratio=float(update_ratio), delta_start_step=start_step)
    cfg["delta_steps"] = steps
    atomic_write_text(directory / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory

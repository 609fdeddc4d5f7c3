"""PEFT's AdaLoRA adapters (``peft_type: ADALORA``) both ways, compiled into the canonical adapter.

PEFT stores per target ``<path>.lora_A`` (r, in), ``lora_E`` (r, 1) and ``lora_B`` (out, r), already cut
to the triplets its ``rank_pattern`` keeps (``{"<path>.lora_E": [bool] * init_r}``), and computes
``x·(A⊙E)ᵀ·Bᵀ · lora_alpha / (ranknum + 1e-5)`` with ``ranknum`` the *initial* rank. The canonical
target is A′ = A⊙E, B′ = B, scale = lora_alpha / (init_r + 1e-5): its rank is the surviving rank, so
slots get smaller rather than zero-padded; a target pruned to rank 0 changes nothing and is left out.
Only Linear and Conv1D targets compile (PEFT's Conv2d AdaLoRA stores A flattened, indistinguishable
from a Linear here: the ONNX stages refuse it by shape).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..core.adalora_config import adalora_scale
from ..core.adapter import Adapter, LoraTarget
from ..core.config import LoraConfig
from ..errors import AdapterError, ConfigError
from ..files.atomic import atomic_write_text
from ..safejson import short_repr
from .peft import CONFIG_NAME, PREFIX, WEIGHTS_NAME, adapter_from_state_dict, full_tensor_items
from .safetensors import write_safetensors

_SVD_KEY = re.compile(
    r"^(?P<path>.+?)\.(?P<part>lora_A|lora_B|lora_E|ranknum)(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?(?:\.weight)?$"
)
_PEFT_DEFAULT_INIT_R = 12


def load_adalora(raw: dict[str, Any], tensors: dict[str, np.ndarray], name: str) -> Adapter:
    """Compile a PEFT AdaLoRA adapter (its config and state dict) into the canonical ``Adapter``."""
    shared = _shared_config(raw)
    init_r = shared.r
    kept = _rank_pattern(raw.get("rank_pattern"), init_r)
    parts: dict[str, dict[str, np.ndarray]] = {}
    rest: dict[str, np.ndarray] = {}
    for key, arr in tensors.items():
        m = _SVD_KEY.match(key[len(PREFIX) :] if key.startswith(PREFIX) else key)
        if m is None:
            rest[key] = arr
        else:
            parts.setdefault(m["path"], {})[m["part"]] = arr
    if not parts:
        raise AdapterError(f"adapter {name!r}: no AdaLoRA tensors (lora_A, lora_E, lora_B) found")
    targets = {}
    for path in sorted(parts):
        want = sum(kept[path]) if path in kept else init_r
        t = _compile(name, path, parts[path], want, shared)
        if t is not None:
            targets[path] = t
    if not targets:
        raise AdapterError(f"adapter {name!r}: every AdaLoRA target was pruned to rank 0 (it is the base model)")
    config = pinned_config(shared, targets)
    lora = {f"{PREFIX}{p}.lora_A.weight": t.A for p, t in targets.items()}
    lora.update({f"{PREFIX}{p}.lora_B.weight": t.B for p, t in targets.items()})
    # The generic reader handles the rest (trained biases, modules_to_save) exactly as for LoRA files.
    adapter = adapter_from_state_dict({**rest, **lora}, config, name=name)
    adapter.targets = {p: dataclasses.replace(adapter.targets[p], scale=t.scale) for p, t in targets.items()}
    return adapter


def compile_svd_target(
    path: str, a: np.ndarray, e: np.ndarray, b: np.ndarray, scale: float, fan_in_fan_out: bool
) -> LoraTarget | None:
    """The canonical target of one AdaLoRA triplet set (only the kept triplets given), or None at rank 0.

    A′ = A⊙E is formed in float32, as PEFT's forward forms it from float32 parameters.
    """
    if a.shape[0] == 0:
        return None
    a32 = np.asarray(a, dtype=np.float32) * np.asarray(e, dtype=np.float32).reshape(-1, 1)
    b32 = np.array(b, dtype=np.float32)
    return LoraTarget(name=path, kind="linear", A=a32, B=b32, scale=scale, fan_in_fan_out=fan_in_fan_out)


def pinned_config(shared: LoraConfig, targets: dict[str, LoraTarget]) -> LoraConfig:
    """A LoRA config whose per-module rank and alpha give each compiled target's rank and scale.

    Keys are the escaped full paths, longest first, so PEFT's first-matching-suffix rule picks each
    module's own entry; saving the compiled adapter as plain LoRA then reproduces it.
    """
    order = sorted(targets, key=lambda p: (-len(p), p))
    return dataclasses.replace(
        shared,
        rank_pattern={re.escape(p): targets[p].rank for p in order},
        alpha_pattern={re.escape(p): targets[p].scale * targets[p].rank for p in order},
    )


def save_adalora_files(
    directory: str | os.PathLike,
    triplets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    config: dict[str, Any],
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write an AdaLoRA adapter in PEFT's format: ``triplets`` maps a module path to its kept (A, E, B).

    ``config`` is the adapter_config.json (``AdaLoraConfig.to_peft_dict``); ``extra`` holds full tensors
    (trained biases, modules_to_save) by their path in the unwrapped model. Each file is written atomically.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (a, e, b) in triplets.items():
        tensors.update({f"{PREFIX}{path}.lora_A": a, f"{PREFIX}{path}.lora_E": e, f"{PREFIX}{path}.lora_B": b})
    tensors.update(full_tensor_items(extra or {}, triplets))
    write_safetensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _shared_config(raw: dict[str, Any]) -> LoraConfig:
    """The fields AdaLoRA shares with LoRA, checked by LoraConfig's own parser, at rank ``init_r``."""
    if raw.get("use_dora"):
        raise ConfigError("an AdaLoRA adapter cannot use DoRA (PEFT refuses it too)")
    init_r = raw.get("init_r", _PEFT_DEFAULT_INIT_R)
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < 1:
        raise ConfigError(f"invalid adapter_config.json: AdaLoRA init_r must be a positive integer, got {init_r!r}")
    # PEFT's AdaLoRA layers take init_r and lora_alpha alone: rsLoRA and rank/alpha patterns do not apply.
    lora = {**raw, "peft_type": "LORA", "r": init_r, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
    shared = LoraConfig.from_peft_dict(lora)
    if shared.lora_alpha <= 0:
        # PEFT then scales by the initial rank in training but by the pruned rank after reloading.
        raise ConfigError(f"AdaLoRA adapters with lora_alpha <= 0 are not supported (got {shared.lora_alpha:g})")
    return shared


def _rank_pattern(pattern: object, init_r: int) -> dict[str, list[bool]]:
    """PEFT's rank_pattern by module path: ``{"<path>.lora_E[.default]": [kept?] * init_r}``."""
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise ConfigError(f"invalid adapter_config.json: AdaLoRA rank_pattern must be an object, got {pattern!r}")
    out = {}
    for key, flags in pattern.items():
        path = re.sub(r"\.lora_E(\.default)?$", "", key)
        if path == key or not path:
            raise ConfigError(
                f"invalid adapter_config.json: AdaLoRA rank_pattern key {short_repr(key)} is not <module>.lora_E"
            )
        if not isinstance(flags, list) or not all(isinstance(f, bool) for f in flags) or len(flags) != init_r:
            raise ConfigError(
                f"invalid adapter_config.json: AdaLoRA rank_pattern[{key!r}] must be {init_r} (init_r) booleans, "
                f"got {short_repr(flags)}"
            )
        out[path] = flags
    return out


def _compile(adapter: str, path: str, p: dict[str, np.ndarray], want: int, shared: LoraConfig) -> LoraTarget | None:
    missing = [k for k in ("lora_A", "lora_E", "lora_B") if k not in p]
    if missing:
        raise AdapterError(f"adapter {adapter!r}: AdaLoRA target {path} has no {' or '.join(missing)}")
    for part in ("lora_A", "lora_E", "lora_B"):
        arr = np.asarray(p[part])
        if not (arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16") or arr.ndim != 2:
            raise AdapterError(
                f"adapter {adapter!r}: {path}.{part} must be a 2-D float tensor, got {arr.dtype} {arr.shape}"
            )
    a, e, b = p["lora_A"], p["lora_E"], p["lora_B"]
    rank = a.shape[0]
    if e.shape != (rank, 1) or b.shape[1] != rank:
        raise AdapterError(
            f"adapter {adapter!r}: {path} has AdaLoRA tensors of mismatched ranks "
            f"(lora_A {a.shape}, lora_E {e.shape}, lora_B {b.shape})"
        )
    if rank != want:
        # PEFT resizes each module to its rank_pattern's kept count (init_r without one) before loading.
        raise AdapterError(
            f"adapter {adapter!r}: {path} holds {rank} AdaLoRA triplets but adapter_config.json keeps {want}"
        )
    ranknum = float(shared.r)
    if "ranknum" in p:  # a stored ranknum is what PEFT's load_state_dict puts in the buffer
        stored = np.asarray(p["ranknum"], dtype=np.float64).reshape(-1)
        if stored.shape != (1,) or not np.isfinite(stored[0]) or stored[0] <= 0:
            raise AdapterError(f"adapter {adapter!r}: {path}.ranknum must hold one positive number")
        ranknum = float(stored[0])
    scale = adalora_scale(shared.lora_alpha, ranknum)
    return compile_svd_target(path, a, e, b, scale, shared.fan_in_fan_out)

"""LoRA-drop adapters (Zhou et al. 2024, arXiv 2402.07721) on disk: PEFT's layout plus shared groups.

``adapter_config.json`` is PEFT's LoRA config with ``"peft_type": "LORA_DROP"`` and
``"shared_groups": {"<group>": ["<module path>", ...]}``. ``adapter_model.safetensors`` holds each kept
module's LoRA under PEFT's keys (``base_model.model.<path>.lora_A.weight``, ...) and each group's one
LoRA once, under ``<group>.lora_A.weight`` / ``<group>.lora_B.weight`` (``<group>.lora_embedding_A`` /
``_B`` for embeddings): no ``base_model.model.`` prefix, so no module path can collide with a group. A
group's members have no LoRA tensors of their own (their DoRA magnitudes, if any, keep PEFT's keys).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..core.adapter import Adapter
from ..core.config import LoraConfig
from ..errors import AdapterError, ConfigError
from ..files.atomic import atomic_write_text
from ..safejson import short_repr
from .peft import CONFIG_NAME, PREFIX, WEIGHTS_NAME, adapter_from_state_dict, adapter_state_dict, weights_metadata
from .safetensors import write_safetensors

PEFT_TYPE = "LORA_DROP"
GROUPS_KEY = "shared_groups"
_PARTS = {"linear": ("lora_A.weight", "lora_B.weight"), "embedding": ("lora_embedding_A", "lora_embedding_B")}
_PARTS["conv"] = _PARTS["linear"]


def _groups(config: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    groups = config.get(GROUPS_KEY)
    if not isinstance(groups, dict) or not all(
        isinstance(g, str) and g and isinstance(ms, list) and ms and all(isinstance(m, str) and m for m in ms)
        for g, ms in groups.items()
    ):
        raise ConfigError(f"LoRA-drop adapter_config.json: {GROUPS_KEY} must map group names to lists of modules")
    for g in groups:
        # Checked before the tensors are read: a prefixed group's tensors would be taken for a module's too.
        if g.startswith(PREFIX):
            raise ConfigError(
                f"LoRA-drop adapter_config.json: shared group {short_repr(g)} starts with PEFT's module prefix "
                f"{PREFIX!r}; group tensors are stored under the bare group name"
            )
    return {g: tuple(ms) for g, ms in groups.items()}


def load_lora_drop(config: dict[str, Any], tensors: dict[str, np.ndarray], name: str) -> Adapter:
    """The canonical adapter of a LoRA-drop file: every module its own target, groups in ``Adapter.shared``."""
    groups = _groups(config)
    plain = {k: v for k, v in config.items() if k != GROUPS_KEY}
    lora_config = LoraConfig.from_peft_dict({**plain, "peft_type": "LORA"})
    per_module = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
    group_keys = {k for k in tensors if not k.startswith(PREFIX)}
    for group, members in groups.items():
        parts = next((p for p in _PARTS.values() if all(f"{group}.{x}" in tensors for x in p)), None)
        if parts is None:
            raise AdapterError(f"adapter {name!r}: shared group {group!r} has no LoRA tensors")
        for m in members:
            for part in parts:
                key = f"{PREFIX}{m}.{part}"
                if key in per_module:
                    raise AdapterError(f"adapter {name!r}: {m} is in shared group {group!r} but has its own {part}")
                per_module[key] = tensors[f"{group}.{part}"]  # the same array: one tensor, read by every member
        group_keys -= {f"{group}.{p}" for p in parts}
    if group_keys:
        raise AdapterError(f"adapter {name!r}: tensor {short_repr(sorted(group_keys)[0])} belongs to no shared group")
    adapter = adapter_from_state_dict(per_module, lora_config, name=name)
    return dataclasses.replace(adapter, shared=groups)


def save_lora_drop_files(
    adapter: Adapter, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write an adapter with shared groups in the LoRA-drop format (each group's tensors once)."""
    if not adapter.shared:
        raise AdapterError(f"adapter {adapter.name!r} has no shared groups: save it in PEFT's format")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(adapter)
    for group, members in adapter.shared.items():
        first = adapter.targets[members[0]]
        parts = _PARTS[first.kind]
        for part, arr in zip(parts, (first.A, first.B)):
            tensors[f"{group}.{part}"] = arr
            for m in members:
                del tensors[f"{PREFIX}{m}.{part}"]
    write_safetensors(directory / WEIGHTS_NAME, tensors, metadata=weights_metadata(adapter))
    cfg = adapter.config.to_peft_dict(base_model_name_or_path)
    cfg["peft_type"] = PEFT_TYPE
    cfg[GROUPS_KEY] = {g: list(ms) for g, ms in sorted(adapter.shared.items())}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory

"""Adapter types other than plain LoRA, by the ``peft_type`` of their adapter_config.json.

Each entry names a loader ``(config: dict, tensors: dict[str, np.ndarray], name: str) -> Adapter`` that
compiles the variant into the canonical adapter; its module is imported only when such a file is read.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

import numpy as np

from ..core.adapter import Adapter

# peft_type (upper case) -> "module:function", relative to this package.
_LOADERS: dict[str, str] = {
    "ADALORA": "peft_adalora:load_adalora",
    "VERA": "peft_vera:load_vera",
    "DELTA_LORA": "delta_lora:load_delta_lora",  # our own format (see formats/delta_lora)
    "LORA_DROP": "lora_drop:load_lora_drop",  # our own format (see formats/lora_drop)
}

Loader = Callable[[dict[str, Any], dict[str, np.ndarray], str], Adapter]


def variant_loader(peft_type: object) -> Loader | None:
    """The loader for a non-LoRA ``peft_type``, or None (plain LoRA, or unknown: LoraConfig refuses it)."""
    if not isinstance(peft_type, str) or peft_type.upper() not in _LOADERS:
        return None
    module, _, func = _LOADERS[peft_type.upper()].partition(":")
    return getattr(import_module(f".{module}", __package__), func)

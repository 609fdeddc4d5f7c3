"""Slot tensors (``.onnx_adapter`` / ``.safetensors`` written by ``inject``/``convert``) read back as a canonical
adapter, for serving on a plain base model (``MergedSession``).

A slot file holds, per module, ``<module>.lora_A`` = Aᵀ and ``<module>.lora_B`` = (s·B)ᵀ (linear and embedding)
or A and s·B (conv): the scale is folded into B′, so the target's scale is 1. DoRA's ``dora_scale`` (g, computed
from the injected model's own W₀), VeRA's vector-only slots and a packed op's concatenated pair
(``<stem>.q_proj+v_proj.lora_A``: which columns are whose is in the model's manifest) have no canonical form
here: refused.
"""

from __future__ import annotations

import numpy as np

from ..core.adapter import Adapter, LoraTarget
from ..core.config import LoraConfig
from ..errors import AdapterError

_PARTS = (".lora_A", ".lora_B")
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def adapter_from_slot_tensors(
    tensors: dict[str, np.ndarray], name: str, kinds: dict[str, str] | None = None
) -> Adapter:
    """The canonical adapter that slot ``tensors`` apply. ``kinds``: module → "linear" | "embedding" for 2-D
    slots (default "linear"; an embedding's slots have the same shapes transposed)."""
    kinds = kinds or {}
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        part = next((p for p in _PARTS if key.endswith(p)), None)
        if part is None:
            what = "DoRA's dora_scale" if key.endswith(".dora_scale") else "a tensor that is no lora_A/lora_B slot"
            raise AdapterError(
                f"adapter {name!r}: {key} is {what}; serve it on the injected model (LoraSession), or give the "
                "PEFT adapter folder"
            )
        module = key[: -len(part)]
        if "+" in module.rsplit(".", 1)[-1]:  # graph.slots.packed_cat: the columns of several modules
            raise AdapterError(
                f"adapter {name!r}: {key} holds a packed projection's slots concatenated (its column blocks are "
                "in the injected model's manifest); serve it on the injected model (LoraSession), or give the "
                "PEFT adapter folder"
            )
        modules.setdefault(module, {})[part] = np.asarray(arr)
    if not modules:
        raise AdapterError(f"adapter {name!r}: no slot tensors")
    targets: dict[str, LoraTarget] = {}
    for module, parts in sorted(modules.items()):
        if len(parts) != 2:
            raise AdapterError(f"adapter {name!r}: {module} needs both lora_A and lora_B")
        a, b = parts[".lora_A"], parts[".lora_B"]
        if a.ndim != b.ndim or a.ndim < 2:
            raise AdapterError(f"adapter {name!r}: {module}: lora_A {a.shape} and lora_B {b.shape} are not LoRA slots")
        if a.dtype.name not in _FLOATS or b.dtype.name not in _FLOATS:
            raise AdapterError(f"adapter {name!r}: {module}: slot tensors must be floating point")
        a, b = a.astype(np.float32), b.astype(np.float32)  # upcasting fp16/bf16 is exact
        if a.ndim == 2:
            kind = kinds.get(module, "linear")
            targets[module] = LoraTarget(
                module, kind, A=np.ascontiguousarray(a.T), B=np.ascontiguousarray(b.T), scale=1.0
            )
        else:
            targets[module] = LoraTarget(module, "conv", A=a, B=b, scale=1.0)
    ranks = sorted({t.rank for t in targets.values()})
    return Adapter(targets=targets, config=LoraConfig(r=ranks[0], lora_alpha=float(ranks[0])), name=name)

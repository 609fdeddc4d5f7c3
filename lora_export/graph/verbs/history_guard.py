"""Never apply one adapter twice without a word: what the model's history says about an adapter about to be
merged, injected, converted or loaded into a served model.

A merge folds an adapter into the weights for good. Its history record names the adapter (``adapter_sha256``),
each target (``targets[].sha256``) and, when the model has LoRA slots (an injected model), the digest of the
slot tensors that adapter fills each slot with (``slots``: module → sha256, see ``slot_digests``). Slot files
carry no adapter digest, so that is how a ``.onnx_adapter`` of a merged adapter is recognised when it is
loaded into the merged model. Every check refuses a repeat unless forced; a history that cannot be read (or is
duplicated) is refused too, since it may hold the adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lora_export.core.adapter import Adapter, target_digest
from lora_export.errors import AdapterError, LoraExportError

from ..model.provenance import HistoryError, merged_targets, merges_of, read_history
from ..model.slot_manifest import Slot, SlotManifest
from ..slots.tensors import adapter_tensors


def slot_digests(tensors: Mapping[str, np.ndarray], manifest: SlotManifest) -> dict[str, str]:
    """module → sha256 over the slot tensors ``tensors`` gives that module (its inputs' names, dtypes,
    shapes and little-endian bytes); modules ``tensors`` leaves at their defaults are left out."""
    out = {}
    for module, slot in sorted(manifest.slots.items()):
        names = [n for n in slot.inputs if n in tensors]
        if not names:
            continue
        h = hashlib.sha256()
        for name in names:
            arr = np.asarray(tensors[name])
            dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
            raw = np.ascontiguousarray(arr, dtype=dtype).tobytes()
            for part in (name.encode("utf-8", "surrogatepass"), str(dtype).encode(), repr(arr.shape).encode()):
                h.update(struct.pack("<Q", len(part)) + part)
            h.update(struct.pack("<Q", len(raw)) + raw)
        out[module] = h.hexdigest()
    return out


def merge_slot_digests(
    model: ir.Model, adapter: Adapter, manifest: SlotManifest, read_weight: Callable[[Slot], np.ndarray]
) -> dict[str, str]:
    """The slot digests of ``adapter`` (unscaled, as inject and convert write it) for an injected ``model``,
    over the targets that have a slot; {} when its tensors cannot be made for these slots."""
    targets = {k: t for k, t in adapter.targets.items() if k in manifest.slots}
    if not targets:
        return {}
    shared = {g: tuple(m for m in ms if m in targets) for g, ms in adapter.shared.items()}
    part = dataclasses.replace(
        adapter,
        targets=targets,
        extra={},
        stored_base={k: v for k, v in adapter.stored_base.items() if k in targets},
        shared={g: ms for g, ms in shared.items() if ms},
    )
    try:
        return slot_digests(adapter_tensors(part, manifest, read_weight), manifest)
    except LoraExportError:
        return {}  # the adapter does not fit the slots: no slot file of it can be loaded either


def history_or_refusal(history: list[dict] | HistoryError, force: bool, hint: str) -> list[dict]:
    """The history, or (unreadable or duplicated) a refusal ending in ``hint`` (``use --force to ...``); with
    ``force``, [] instead."""
    if not isinstance(history, HistoryError):
        return history
    if force:
        return []
    raise HistoryError(f"{history}; cannot tell what was merged into this model: {hint}") from None


def safe_history(model: ir.Model | Mapping[str, str]) -> list[dict] | HistoryError:
    """``read_history``, its error returned instead of raised."""
    try:
        return read_history(model)
    except HistoryError as e:
        return e


def merged_repeat(history: Sequence[dict], adapter: Adapter) -> str | None:
    """Why ``adapter`` (or one of its targets, same tensors) is in the model's weights already, or None."""
    digest = adapter.digest()
    done = merges_of(history, digest)
    if done:
        n = done[-1]
        return (
            f"adapter {adapter.name!r} is already merged into this model (history record {n}: merge of "
            f"{history[n - 1]['adapter']!r}, sha256 {digest[:12]})"
        )
    before = merged_targets(history)
    again = [(t.name, before[(t.name, d)]) for t in adapter if (t.name, d := target_digest(t)) in before]
    if again:
        name, n = again[0]
        more = f" and {len(again) - 1} more" if len(again) > 1 else ""
        return (
            f"adapter {adapter.name!r}: target {name}{more} already merged into this model with the same "
            f"tensors (history record {n}: merge of {history[n - 1]['adapter']!r})"
        )
    return None


def slots_repeat(history: Sequence[dict], digests: Mapping[str, str], what: str) -> str | None:
    """Why the slot tensors with ``digests`` (module → sha256) are in the model's weights already, or None."""
    for i in range(len(history), 0, -1):
        record = history[i - 1]
        if record.get("operation") != "merge":
            continue
        same = sorted(m for m, d in (record.get("slots") or {}).items() if digests.get(m) == d)
        if same:
            more = f" and {len(same) - 1} more" if len(same) > 1 else ""
            return (
                f"{what}: slot {same[0]}{more} holds the adapter already merged into this model "
                f"(history record {i}: merge of {record['adapter']!r})"
            )
    return None


def injected_repeat(history: Sequence[dict], adapter: Adapter) -> str | None:
    """Why merging ``adapter`` into an injected model makes its own slot files apply it twice, or None: the
    model was injected with it (its digest), or with a part of it (a target with the same tensors)."""
    digest = adapter.digest()
    mine = {(t.name, target_digest(t)) for t in adapter}
    for i in range(len(history), 0, -1):
        record = history[i - 1]
        if record.get("operation") != "inject":
            continue
        same = record.get("adapter_sha256") == digest
        shared = sorted(t["target"] for t in record.get("targets", []) if (t["target"], t.get("sha256")) in mine)
        if same or shared:
            part = "" if same else f" (target {shared[0]}{' and more' if len(shared) > 1 else ''}, same tensors)"
            return (
                f"adapter {adapter.name!r} has LoRA slots in this model{part} (history record {i}: inject of "
                f"{record['adapter']!r}); merged too, its slot file would apply it a second time"
            )
    return None


def refuse(
    why: str | None, force: bool, hint: str, consequence: str = "applying it again adds its delta twice"
) -> None:
    """Raise a one-line AdapterError ``<why>; <consequence>: <hint>`` unless ``force``."""
    if why is not None and not force:
        raise AdapterError(f"{why}; {consequence}: {hint}")

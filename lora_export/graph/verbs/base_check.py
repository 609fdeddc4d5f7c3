"""Is this the base checkpoint the adapter was made for? Compare its base fingerprint (``fingerprint``) with
the model's weights and with ``--base-weights``; refuse a mismatch in one line unless forced.

A weight an earlier merge changed (the model's history says which) is no longer the base: it is left out
of the comparison, as are targets without a fingerprint entry. Adapters without a fingerprint (PEFT's own
files) are not checked; ``inspect`` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from lora_export.core.adapter import Adapter
from lora_export.core.fingerprint import compare, short_code, weight_entry
from lora_export.errors import AdapterError, LoraExportError

from ..match.value_match import base_key
from ..model.slot_manifest import Slot, SlotManifest
from ..targets.resolve import ResolvedTarget

# The model weight's own fingerprint entry (of its value read back in ΔW's layout), its stored dtype, and
# whether it is stored quantized. Entries, not weights: small enough to cache for a session's lifetime.
WeightInfo = tuple[dict, np.dtype, bool]


def merged_weights(history: Sequence[dict]) -> set[str]:
    """Module paths and initializer names whose values an earlier merge changed."""
    out: set[str] = set()
    for record in history:
        if record.get("operation") != "merge":
            continue
        for t in record.get("targets", []):
            if t.get("status") == "matched":
                out.add(t["target"])
                if t.get("initializer"):
                    out.add(t["initializer"])
    return out


def stored_info(value, layout) -> tuple[np.dtype | None, bool]:
    """The dtype a weight is stored in and whether it is quantized (read back dequantized)."""
    lossy = bool(getattr(layout, "lossy_write", False))
    try:
        dtype = np.dtype(value.const_value.dtype.numpy())
    except Exception:  # noqa: BLE001 - no constant or an unusual dtype: compare as read back
        return None, lossy
    return dtype, lossy or dtype.kind != "f"


def _info(w: np.ndarray, dtype: np.dtype | None, lossy: bool) -> WeightInfo:
    w = np.asarray(w)
    return weight_entry(w), np.dtype(dtype if dtype is not None else w.dtype), lossy


def resolved_info(r: ResolvedTarget) -> WeightInfo:
    return _info(r.layout.read(r.node), *stored_info(r.value, r.layout))


def mismatch(
    entries: Mapping[str, dict], weights: Mapping[str, Callable[[], WeightInfo | None]]
) -> tuple[str, str] | None:
    """The first (module, problem) where the weights differ from ``entries``; modules whose weight is not
    given (or cannot be read alone: None) are left out."""
    for module in sorted(entries):
        info = weights[module]() if module in weights else None
        problem = compare(entries[module], *info) if info is not None else None
        if problem:
            return module, problem
    return None


def refuse_mismatch(found: tuple[str, str] | None, what: str, against: str, force: bool, hint: str) -> None:
    if found is not None and not force:
        module, problem = found
        raise AdapterError(f"{what} was made for other base weights than {against}: {module}: {problem}; {hint}")


def check_resolved(
    adapter: Adapter, matched: Iterable[ResolvedTarget], history: Sequence[dict], force: bool, hint: str
) -> None:
    """merge and inject: the adapter's fingerprint against the weights its targets resolved to."""
    if not adapter.base_fingerprint:
        return
    changed = merged_weights(history)
    weights = {}
    for r in matched:
        if r.target.name in changed or r.value.name in changed:
            continue
        weights[r.target.name] = lambda r=r: resolved_info(r)
    found = mismatch(adapter.base_fingerprint, weights)
    refuse_mismatch(found, f"adapter {adapter.name!r}", "this model's", force, hint)


def check_base_weights(adapter: Adapter, base_weights: Mapping[str, np.ndarray] | None, force: bool, hint: str) -> None:
    """The adapter's fingerprint against ``--base-weights`` (the base's state dict, torch layout)."""
    if not adapter.base_fingerprint or not base_weights:
        return
    weights = {}
    for module in adapter.base_fingerprint:
        key = base_key(module, base_weights)
        target = adapter.targets.get(module)
        if key is not None and target is not None:
            w = np.asarray(base_weights[key])
            w = w.T if target.fan_in_fan_out and w.ndim == 2 else w  # a state dict holds HF Conv1D as (in, out)
            weights[module] = lambda w=w: _info(w, w.dtype, False)
    found = mismatch(adapter.base_fingerprint, weights)
    refuse_mismatch(found, f"adapter {adapter.name!r}", "--base-weights", force, hint)


def _slot_weight(slot: Slot, read_weight: Callable[[Slot], np.ndarray]) -> np.ndarray | None:
    """The base weight behind ``slot``, or None where the slot's weight cannot be read alone (a slice of a
    packed weight: the manifest does not say where) or not at all."""
    try:
        w = np.asarray(read_weight(slot))
    except LoraExportError:
        return None
    return w if list(w.shape) == list(slot.weight_shape) else None


def slot_weights(
    manifest: SlotManifest,
    read_weight: Callable[[Slot], np.ndarray],
    history: Sequence[dict],
    cache: dict[str, WeightInfo | None] | None = None,
) -> dict[str, Callable[[], WeightInfo | None]]:
    """module → its base weight behind an injected model's slot, for the slots no merge changed (read once
    per ``cache``; None where it cannot be read alone)."""
    changed = merged_weights(history)
    stored = getattr(read_weight, "stored", None)
    cache = {} if cache is None else cache

    def info(slot: Slot) -> WeightInfo | None:
        if slot.module not in cache:
            w = _slot_weight(slot, read_weight)
            dtype, lossy = stored(slot) if stored is not None and w is not None else (None, False)
            cache[slot.module] = None if w is None else _info(w, dtype, lossy)
        return cache[slot.module]

    return {m: (lambda s=s: info(s)) for m, s in manifest.slots.items() if m not in changed and s.weight not in changed}


def slot_file_entries(
    manifest: SlotManifest, read_weight: Callable[[Slot], np.ndarray], modules: Iterable[str]
) -> dict[str, dict]:
    """The fingerprint a slot file for ``modules`` of this injected model carries: its weights as they are
    (those that can be read alone)."""
    out = {}
    release = getattr(read_weight, "release", None)
    for m in sorted(modules):
        w = _slot_weight(manifest.slots[m], read_weight) if m in manifest.slots else None
        if w is not None:
            out[m] = weight_entry(w)
            if release is not None:
                release(manifest.slots[m])  # its memory-mapped pages: one weight's at a time
    return out


def code_mismatch(
    code: int, modules: Iterable[str], weights: Mapping[str, Callable[[], WeightInfo]]
) -> tuple[str, str] | None:
    """An ``.onnx_adapter``'s fingerprint code against the model; None when it matches or cannot be checked
    (a module a merge changed since)."""
    modules = sorted(modules)
    if not modules or any(m not in weights for m in modules):
        return None
    infos = {m: weights[m]() for m in modules}
    entries = {m: info[0] for m, info in infos.items() if info is not None}
    if not entries or short_code(entries) == code:
        return None
    shown = ", ".join(modules[:3]) + (f", ... ({len(modules) - 3} more)" if len(modules) > 3 else "")
    return shown, "other values (the file's fingerprint code differs)"


def fingerprint_report(
    adapter: Adapter,
    matched: Iterable[ResolvedTarget],
    history: Sequence[dict],
    base_weights: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """For ``inspect``: whether the adapter carries a base fingerprint, and where it differs from the model's
    weights (and ``base_weights``)."""
    if adapter.base_fingerprint is None:
        return {"present": False}
    changed = merged_weights(history)
    report: dict = {"present": True, "targets": len(adapter.base_fingerprint), "checked": 0, "differs": []}
    for r in matched:
        entry = adapter.base_fingerprint.get(r.target.name)
        if entry is None or r.target.name in changed or r.value.name in changed:
            continue
        report["checked"] += 1
        problem = compare(entry, *resolved_info(r))
        if problem:
            report["differs"].append({"target": r.target.name, "detail": problem})
    if base_weights:
        try:
            check_base_weights(adapter, base_weights, False, "")
        except AdapterError as e:
            report["base_weights_differ"] = str(e).rstrip("; ")
    return report


def format_fingerprint(report: dict) -> str:
    """One line of ``inspect``'s text for ``fingerprint_report``."""
    if not report["present"]:
        return (
            "base fingerprint: none (not written by lora-export): a wrong base checkpoint cannot be detected; "
            "pass --base-weights to match targets by value"
        )
    if report["differs"]:
        first = report["differs"][0]
        more = f" and {len(report['differs']) - 1} more" if len(report["differs"]) > 1 else ""
        return (
            f"base fingerprint: DIFFERS from this model's weights at {first['target']}{more} ({first['detail']}): "
            "made for another base checkpoint; merge, inject and convert refuse it without --force"
        )
    line = (
        f"base fingerprint: matches this model's weights ({report['checked']} of {report['targets']} targets checked)"
    )
    if report.get("base_weights_differ"):
        line += "; DIFFERS from --base-weights"
    return line

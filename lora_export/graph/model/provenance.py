"""Provenance: what ``merge`` and ``inject`` did to a model, recorded in the model itself.

``metadata_props["lora_export.history"]`` holds one JSON list, oldest first; every merge or inject
appends one record per adapter (compact JSON, sorted keys)::

  {"operation": "merge" | "inject",
   "adapter": "<adapter name>",               # the adapter folder's name
   "adapter_sha256": "<64 hex digits>",       # adapter.adapter_digest: its tensors, scales, layouts
   "scale": 1.0,                              # --scale (inject: always 1.0)
   "tool": "lora-export", "version": "<lora_export.__version__>",
   "forced": true,                            # only on a merge repeated with --force
   "slots": {"<module>": "<sha256>", ...},    # merge into an injected model only: the slot tensors this
                                              # adapter's slot file holds (history_guard.slot_digests)
   "targets": [{"target": "<module path>", "status": "matched" | "absent" | "skipped",
                "initializer": "<initializer written or slotted>" | null,
                "sha256": "<adapter.target_digest: this target's tensors>"}, ...],
   "extras": [{"tensor": "<parameter path>", "status": ..., "initializer": ...}, ...]}

``matched``: merged into (inject: given a slot on) ``initializer``; ``absent``: proven not in the graph,
no effect; ``skipped``: not found and left out under ``--allow-partial`` (``unmatched`` is accepted when
reading, never written). Targets are listed in the adapter's order, extras (full replacement tensors,
merge only) sorted by path. With ``--only-targets`` the record (and digest) covers the selected part.

Nothing time-, host- or path-dependent is stored, so the same operation on the same inputs writes the
same bytes. A history that is not valid JSON of this shape raises ``HistoryError`` (a one-line
``ModelError``): ``merge`` refuses it (with ``--force`` the text moves to ``lora_export.history.unreadable``
and the history restarts), ``inject`` moves it aside the same way, ``inspect`` notes it and goes on.

A model whose metadata holds ``lora_export.history`` more than once is refused the same way, whatever the
entries say: the IR keeps only the last one, and a stale ``[]`` after the real history would hide every
earlier merge (``model_io.load_model`` records the duplicates in ``model.meta[DUPLICATES_META]``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from lora_export.errors import ModelError

HISTORY_KEY = "lora_export.history"
UNREADABLE_KEY = "lora_export.history.unreadable"
OPERATIONS = ("merge", "inject")
STATUSES = ("matched", "absent", "unmatched", "skipped")
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: ``model.meta`` key: lora_export.* metadata keys the model file holds more than once → all their values.
DUPLICATES_META = "lora_export.duplicated_metadata"


class HistoryError(ModelError):
    """A ``lora_export.history`` entry that is not valid JSON of the documented shape."""


def _props(model_or_props: ir.Model | Mapping[str, str]) -> Mapping[str, str]:
    return model_or_props.metadata_props if isinstance(model_or_props, ir.Model) else model_or_props


def duplicated_metadata(entries: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """The ``lora_export.*`` keys that ``entries`` (a model file's metadata, in order) hold more than once."""
    seen: dict[str, list[str]] = {}
    for key, value in entries:
        if key.startswith("lora_export."):
            seen.setdefault(key, []).append(value)
    return {k: v for k, v in seen.items() if len(v) > 1}


def duplicate_problem(duplicates: Mapping[str, Sequence[str]], key: str = HISTORY_KEY) -> str | None:
    """The one-line reason a model holding ``key`` several times is refused (None when it holds it once)."""
    values = duplicates.get(key)
    if not values:
        return None
    return (
        f"duplicated {key} metadata ({len(values)} entries in the model file): contradictory provenance, "
        "which would hide earlier records"
    )


def read_history(model_or_props: ir.Model | Mapping[str, str]) -> list[dict]:
    """The model's history records, oldest first ([] when it has none); HistoryError when malformed."""
    if isinstance(model_or_props, ir.Model):
        problem = duplicate_problem(model_or_props.meta.get(DUPLICATES_META) or {})
        if problem:
            raise HistoryError(problem)
    raw = _props(model_or_props).get(HISTORY_KEY)
    if raw is None:
        return []
    try:
        data = json.loads(raw, parse_constant=_not_finite, parse_float=_finite_float)
    except _NotFinite as e:
        raise HistoryError(f"corrupt {HISTORY_KEY} metadata ({e})") from None
    except (ValueError, RecursionError) as e:
        raise HistoryError(f"corrupt {HISTORY_KEY} metadata (not JSON: {type(e).__name__})") from None
    if not isinstance(data, list):
        raise HistoryError(f"corrupt {HISTORY_KEY} metadata (a JSON {type(data).__name__}, expected a list)")
    for i, record in enumerate(data, 1):
        problem = record_problem(record)
        if problem:
            raise HistoryError(f"corrupt {HISTORY_KEY} metadata (record {i}: {problem})")
    return data


class _NotFinite(ValueError):
    pass


def _not_finite(name: str) -> float:
    # JSON has no NaN or Infinity; Python's parser accepts them unless told otherwise, and a history holding
    # one could never be written back (``encode`` refuses it).
    raise _NotFinite(f"a non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise _NotFinite(f"a non-finite number {text}")
    return value


def record_problem(record: object) -> str | None:
    """Why ``record`` is not a valid history record, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, expected an object"
    if record.get("operation") not in OPERATIONS:
        return f"operation {record.get('operation')!r} is not one of {', '.join(OPERATIONS)}"
    for key in ("adapter", "version"):
        if not isinstance(record.get(key), str):
            return f"{key!r} missing or not a string"
    digest = record.get("adapter_sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        return "'adapter_sha256' missing or not 64 hex digits"
    scale = record.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return "'scale' missing or not a number"
    if not math.isfinite(scale):
        return f"'scale' is {scale} (not finite)"
    slots = record.get("slots", {})
    if not isinstance(slots, dict) or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in slots.values()):
        return "'slots' is not an object of 64-hex-digit digests"
    for key, name_key in (("targets", "target"), ("extras", "tensor")):
        entries = record.get(key, [])
        if not isinstance(entries, list):
            return f"{key!r} is not a list"
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get(name_key), str):
                return f"a {key!r} entry without a {name_key!r} name"
            if entry.get("status") not in STATUSES:
                return f"{entry[name_key]}: status {entry.get('status')!r} is not one of {', '.join(STATUSES)}"
            if not isinstance(entry.get("initializer"), (str, type(None))):
                return f"{entry[name_key]}: 'initializer' is not a string or null"
            sha = entry.get("sha256")
            if sha is not None and (not isinstance(sha, str) or not _HEX64.fullmatch(sha)):
                return f"{entry[name_key]}: 'sha256' is not 64 hex digits"
    return None


def encode(history: Sequence[dict]) -> str:
    """The stored form: compact JSON, sorted keys (byte-deterministic)."""
    # ASCII (\u escapes): names from undecodable file names (lone surrogates) still store as valid UTF-8.
    return json.dumps(list(history), sort_keys=True, separators=(",", ":"), allow_nan=False)


def append_history(model: ir.Model, records: Sequence[dict], *, replace_unreadable: bool = False) -> list[dict]:
    """Append ``records`` to the model's history (in place) and return the whole history.

    A malformed history raises HistoryError, unless ``replace_unreadable``: then its text moves to
    ``lora_export.history.unreadable`` (nothing is lost) and the history restarts with ``records``.
    """
    try:
        history = read_history(model)
    except HistoryError:
        if not replace_unreadable:
            raise
        duplicates = (model.meta.get(DUPLICATES_META) or {}).get(HISTORY_KEY)
        # Every entry of a duplicated history is kept aside (a JSON list of their texts).
        model.metadata_props[UNREADABLE_KEY] = (
            json.dumps(list(duplicates)) if duplicates else model.metadata_props[HISTORY_KEY]
        )
        if duplicates:
            model.meta[DUPLICATES_META] = {k: v for k, v in model.meta[DUPLICATES_META].items() if k != HISTORY_KEY}
        history = []
    for record in records:
        problem = record_problem(record)
        if problem:  # a bug here, not bad input: never store what read_history would refuse
            raise ValueError(f"invalid history record: {problem}")
    history = [*history, *records]
    model.metadata_props[HISTORY_KEY] = encode(history)
    return history


def _version() -> str:
    from lora_export._version import __version__

    return __version__


def make_record(
    operation: str,
    adapter: str,
    digest: str,
    *,
    scale: float = 1.0,
    targets: Sequence[dict] = (),
    extras: Sequence[dict] = (),
    forced: bool = False,
) -> dict:
    """One history record (see the module docstring)."""
    record = {
        "operation": operation,
        "adapter": adapter,
        "adapter_sha256": digest,
        "scale": float(scale),
        "tool": "lora-export",
        "version": _version(),
        "targets": [dict(t) for t in targets],
    }
    if extras:
        record["extras"] = [dict(e) for e in extras]
    if forced:
        record["forced"] = True
    return record


def target_entry(name: str, status: str, initializer: str | None, sha256: str | None = None) -> dict:
    # A target not found that an operation went ahead without was skipped (merge --allow-partial).
    entry = {"target": name, "status": "skipped" if status == "unmatched" else status, "initializer": initializer}
    if sha256 is not None:
        entry["sha256"] = sha256
    return entry


def extra_entry(key: str, status: str, initializer: str | None) -> dict:
    return {"tensor": key, "status": "skipped" if status == "unmatched" else status, "initializer": initializer}


def merges_of(history: Sequence[dict], digest: str) -> list[int]:
    """1-based positions of the merges of the adapter with ``digest`` in ``history``."""
    return [i for i, r in enumerate(history, 1) if r.get("operation") == "merge" and r.get("adapter_sha256") == digest]


def merged_targets(history: Sequence[dict]) -> dict[tuple[str, str], int]:
    """(module path, target sha256) → 1-based position of the last merge that folded that target in."""
    out = {}
    for i, record in enumerate(history, 1):
        if record.get("operation") != "merge":
            continue
        for t in record.get("targets", []):
            if t.get("status") == "matched" and t.get("sha256"):
                out[(t["target"], t["sha256"])] = i
    return out


def summarize(record: dict) -> str:
    """``3 matched, 1 absent`` (counts of the record's target and extra statuses, in STATUSES order)."""
    statuses = [e.get("status") for e in [*record.get("targets", []), *record.get("extras", [])]]
    parts = [f"{statuses.count(s)} {s}" for s in STATUSES if statuses.count(s)]
    return ", ".join(parts) or "no targets"

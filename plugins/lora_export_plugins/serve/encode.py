"""Response bodies as JSON bytes, fast: a response carries a model's outputs (logits: thousands of floats per
row), and Python's ``json`` spends more time writing them than the model spends computing them.

With ``orjson`` installed (part of ``lora-export[serve]``) arrays are written by it directly; without it,
float32/float16 arrays are formatted with ``%.9g``, which a float32 reader parses back to the same value.
Either way the body is the JSON that ``json.dumps(array.tolist())`` would give, up to how floats are spelled.
Non-finite floats keep Python's ``json`` spelling (``NaN``, ``Infinity``), which orjson would turn into null.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

try:  # optional: the fallback below is exact too, only slower
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

_SHORT_FLOATS = (np.float32, np.float16)
_DIGITS = "%.9g"  # 9 significant digits: what a float32 needs to read back the same


def array_json(value: np.ndarray) -> bytes:
    """One array as JSON nested lists."""
    arr = np.asarray(value)
    finite = arr.dtype.kind != "f" or bool(np.isfinite(arr).all())
    if _orjson is not None and finite and arr.ndim:
        try:
            return _orjson.dumps(np.ascontiguousarray(arr), option=_orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # a dtype orjson does not write (JSONEncodeError is a TypeError)
            pass
    if finite and arr.dtype.type in _SHORT_FLOATS and arr.ndim and arr.size:
        return _float_rows(arr).encode()
    return json.dumps(arr.tolist(), separators=(",", ":")).encode()


def _float_rows(arr: np.ndarray) -> str:
    """``%.9g`` per value (9 significant digits round-trip a float32), nested by the array's shape. Whole
    numbers get ``%.1f``, so that a float stays a float in JSON (``1.0``, not ``1``), as ``json`` writes it."""
    n = arr.shape[-1]
    flat = arr.reshape(-1, n).astype(np.float64)
    whole = (flat == np.trunc(flat)) & (np.abs(flat) < 1e9)  # the ones %.9g would write without a point
    plain = "[" + ",".join([_DIGITS] * n) + "]"
    parts = []
    for values, w in zip(flat.tolist(), whole):
        fmt = "[" + ",".join(np.where(w, "%.1f", _DIGITS).tolist()) + "]" if w.any() else plain
        parts.append(fmt % tuple(values))
    for d in reversed(arr.shape[:-1]):
        parts = ["[" + ",".join(parts[i : i + d]) + "]" for i in range(0, len(parts), d)]
    return parts[0]


def outputs_body(names: Sequence[str], values: Sequence[np.ndarray]) -> bytes:
    """The response body for ``/v1/run``: ``{"outputs": {name: nested lists}}``."""
    fields = [json.dumps(n).encode() + b":" + array_json(v) for n, v in zip(names, values)]
    return b'{"outputs":{' + b",".join(fields) + b"}}"

"""The HTTP protocol's requests and responses, as pure functions: JSON in, checked numpy feeds out.

``POST /v1/run`` takes ``{"adapter": name or null, "inputs": {input name: nested lists}}`` and answers
``{"outputs": {output name: nested lists}}``. A bad request raises ``BadRequest`` with one line (a 400); an
adapter that is not available raises ``UnknownAdapter`` (a 404).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from lora_export.runtime.feeds import ORT_TYPES

# The input types JSON numbers can carry exactly (bfloat16 and other opaque types are refused).
_TYPES = {k: v.type for k, v in ORT_TYPES.items() if v.kind in "biuf"}
MAX_BODY = 64 << 20


class BadRequest(Exception):
    """A malformed body or inputs that do not fit the model: HTTP 400."""

    status = 400


class UnknownAdapter(Exception):
    """An adapter the server cannot load: HTTP 404."""

    status = 404


def parse_run(body: bytes) -> tuple[str | None, bool, dict]:
    """The adapter name, whether the body named one (``null`` included), and the raw inputs of a ``/v1/run`` body."""
    if len(body) > MAX_BODY:
        raise BadRequest(f"request body over {MAX_BODY >> 20} MiB")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"body is not JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise BadRequest('body must be a JSON object {"adapter": ..., "inputs": {...}}')
    unknown = sorted(set(doc) - {"adapter", "inputs"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; expected 'adapter' and 'inputs'")
    adapter = doc.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise BadRequest("'adapter' must be a non-empty string or null")
    inputs = doc.get("inputs")
    if not isinstance(inputs, dict):
        raise BadRequest("'inputs' must be an object of input name to nested lists")
    return adapter, "adapter" in doc, inputs


def to_feeds(inputs: Mapping, model_inputs: Mapping[str, tuple[str, list]]) -> dict[str, np.ndarray]:
    """Checked numpy feeds: every model input present, of its dtype (JSON numbers must fit it exactly), rank
    and fixed dimensions; dimension 0 is the batch and at least 1. ``model_inputs``: name -> (type, shape)."""
    extra = sorted(set(inputs) - set(model_inputs))
    if extra:
        known = ", ".join(model_inputs)
        raise BadRequest(f"unknown input(s) {', '.join(map(repr, extra))}; the model's inputs: {known}")
    missing = [k for k in model_inputs if k not in inputs]
    if missing:
        raise BadRequest(f"missing input(s) {', '.join(map(repr, missing))}")
    feeds: dict[str, np.ndarray] = {}
    batch = None
    for name, (type_, shape) in model_inputs.items():
        want = _TYPES.get(type_)
        if want is None:
            raise BadRequest(f"input {name!r} has type {type_}, which this server cannot take over JSON")
        arr = _array(name, inputs[name], want)
        if arr.ndim != len(shape) or arr.ndim == 0:
            raise BadRequest(f"input {name!r} has rank {arr.ndim}, the model expects rank {len(shape)}")
        for i, (got, dim) in enumerate(zip(arr.shape, shape)):
            if isinstance(dim, int) and dim > 0 and got != dim:
                raise BadRequest(f"input {name!r} has shape {list(arr.shape)}, dimension {i} must be {dim}")
        if arr.shape[0] == 0:
            raise BadRequest(f"input {name!r} has no rows")
        if batch is not None and arr.shape[0] != batch:
            raise BadRequest(f"inputs disagree on the batch size ({batch} and {arr.shape[0]})")
        batch = arr.shape[0]
        feeds[name] = arr
    return feeds


def _array(name: str, value, want) -> np.ndarray:
    try:
        raw = np.array(value)
    except (ValueError, RecursionError):
        raise BadRequest(f"input {name!r} is not a rectangular nested list") from None
    if raw.dtype == object or raw.dtype.kind not in "biuf":
        raise BadRequest(f"input {name!r} must hold numbers only, in a rectangular nested list")
    kind = np.dtype(want).kind
    if kind in "iu" and raw.dtype.kind == "f":
        raise BadRequest(f"input {name!r} must hold integers ({np.dtype(want).name}), got floats")
    if kind == "b" and raw.dtype.kind != "b":
        raise BadRequest(f"input {name!r} must hold true/false values")
    if kind in "iu" and raw.size:
        info = np.iinfo(want)
        if raw.min() < info.min or raw.max() > info.max:
            raise BadRequest(f"input {name!r} has values outside {np.dtype(want).name}")
    if kind == "f" and raw.size and not all(math.isfinite(float(v)) for v in (raw.min(), raw.max())):
        raise BadRequest(f"input {name!r} holds a non-finite number")
    return np.ascontiguousarray(raw.astype(want))

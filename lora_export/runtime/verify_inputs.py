"""The inputs ``verify`` runs models on: given (an ``.npz`` or a dict, checked against the model's inputs)
or random from the graph's input types.

Random inputs: token ids uniform over the vocabulary the model's embedding tables state
(``token_ids``), attention masks ones, token type ids zeros, position ids 0..n-1, floats standard
normal; symbolic dimensions batch 2, sequence 8 unless ``dims`` names them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import LoraExportError, first_line
from ..files.checks import require_regular_file

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
# Integer inputs that index no embedding table: small non-negative ids, as before vocabularies were read.
UNBOUNDED_IDS = 100


def symbolic_dims(specs) -> list[str]:
    """The names of the symbolic dimensions in ONNX Runtime input specs, in order of appearance."""
    found = [d for spec in specs for d in (spec.shape or ()) if isinstance(d, str) and d]
    return list(dict.fromkeys(found))


def check_dims(specs, dims: Mapping[str, int], path="the model") -> None:
    """Refuse a --dim for a name that is not a symbolic dimension of the model's inputs."""
    known = symbolic_dims(specs)
    for name in dims:
        if name not in known:
            have = ", ".join(known) if known else "none: every input dimension is fixed"
            raise LoraExportError(f"--dim {name}: not a symbolic dimension of {path}'s inputs (symbolic: {have})")


def model_feeds(
    specs,
    inputs,
    seed: int,
    dims: Mapping[str, int],
    path="the model",
    id_bounds: Mapping[str, int | None] | None = None,
) -> dict[str, np.ndarray]:
    """The feeds for inputs ``specs``: ``inputs`` (dict or ``.npz`` path) checked, or random ones."""
    check_dims(specs, dims, path)
    if inputs is None:
        return random_inputs(specs, seed=seed, dims=dims, id_bounds=id_bounds)
    given = _load_inputs(inputs)
    want = [s.name for s in specs]
    missing = [n for n in want if n not in given]
    extra = [n for n in given if n not in want]
    if missing or extra:
        raise LoraExportError(
            f"inputs do not match the model's: missing {missing or 'none'}, unexpected {extra or 'none'} "
            f"(model inputs: {want})"
        )
    feeds = {}
    for spec in specs:
        arr = np.asarray(given[spec.name])
        want_dtype = ORT_TYPES.get(spec.type)
        if want_dtype is not None and arr.dtype != want_dtype:
            if arr.dtype.kind != np.dtype(want_dtype).kind:
                raise LoraExportError(f"input {spec.name!r} has dtype {arr.dtype}, the model wants {spec.type}")
            arr = arr.astype(want_dtype)
        feeds[spec.name] = arr
    return feeds


def _load_inputs(inputs) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        return {str(k): np.asarray(v) for k, v in inputs.items()}
    path = require_regular_file(inputs, "inputs file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("not an .npz archive")
            return {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a bad archive
        raise LoraExportError(f"{path}: not a readable .npz of inputs ({type(e).__name__}: {first_line(e)})") from None


def random_inputs(
    specs,
    *,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    id_bounds: Mapping[str, int | None] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs from ONNX Runtime input specs (name, type, shape), deterministic in ``seed``.

    ``id_bounds`` (``token_ids.token_id_bounds``): integer inputs listed there are drawn from
    ``[0, bound)``; one listed with None (it indexes a table of unstated size) is refused: pass inputs."""
    dims = dict(dims or {})
    bounds = dict(id_bounds or {})
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = ORT_TYPES.get(spec.type)
        if dtype is None:
            raise LoraExportError(f"input {spec.name!r}: cannot generate {spec.type}; pass --inputs")
        shape = tuple(_dim(d, i, dims) for i, d in enumerate(spec.shape or ()))
        name = spec.name.lower()
        if np.dtype(dtype).kind == "f":
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_ or "mask" in name:
            arr = np.ones(shape, dtype=dtype)
        elif "token_type" in name or "segment" in name:
            arr = np.zeros(shape, dtype=dtype)
        elif "position" in name and shape:
            arr = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        else:
            high = _id_bound(spec.name, bounds, dtype)
            arr = rng.integers(0, high, size=shape).astype(dtype)
        feeds[spec.name] = arr
    return feeds


def _id_bound(name: str, bounds: Mapping[str, int | None], dtype) -> int:
    if name not in bounds:
        return UNBOUNDED_IDS
    bound = bounds[name]
    if bound is None:
        raise LoraExportError(
            f"input {name!r} indexes a table whose size the model does not state, so random ids could run "
            "past it; pass --inputs with ids the model accepts"
        )
    return int(min(bound, np.iinfo(dtype).max + 1))


def _dim(d, axis: int, dims: Mapping[str, int]) -> int:
    if isinstance(d, int) and d >= 0:
        return d
    name = str(d) if d is not None else ""
    if name in dims:
        return int(dims[name])
    low = name.lower()
    if "batch" in low:
        return 2
    if any(k in low for k in ("seq", "len", "token", "time")):
        return 8
    # Exporters often name dims s0, s1 ...: by position, the first is the batch, the second a sequence.
    return {0: 2, 1: 8}.get(axis, 1)

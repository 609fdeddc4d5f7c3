"""Base-weight fingerprints: which base weights an adapter file was made for, so a wrong checkpoint is caught.

An adapter trained on one GPT-2 merges into any GPT-2 of the same shapes; only the values tell them apart.
Files we write (PEFT folders from ``save_adapter``, ``.safetensors`` and ``.onnx_adapter`` slot files) carry,
per target module, a fingerprint of the base weight it was made for, taken in ΔW's layout
(``LoraTarget.weight_shape``: (out, in) for linear, HF Conv1D transposed back; the layout every ONNX weight
layout reads back to: transposed MatMul weights, packed Q/K/V slices and quantized weights included), so
both sides compare like for like::

  {"shape": [out, in], "dtype": "float32",
   "sha256": "<sha256 of the weight as little-endian float32, C order>",
   "samples": "<base64 of 32 float32 values at fixed positions>"}

Comparing (``entry_problem``): equal sha256 is a match. A model that stores the weight at the same or a
wider float precision must give the same sha256; one that stores it narrower (float16, bfloat16) must hold
the samples rounded into its dtype; a quantized weight (read back dequantized) must be near the samples
(relative error under 0.5: quantization costs a few percent, another checkpoint about 140%). The whole
fingerprint is one JSON object, ``{"version": 1, "targets": {module: entry}}``, stored in a safetensors
file's ``__metadata__`` under ``lora_export.base_fingerprint``. A ``.onnx_adapter`` holds only two integers:
its adapter version then carries a 30-bit code of the sha256s (``short_code``), compared exactly.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping

import numpy as np

from ..errors import AdapterError

FINGERPRINT_KEY = "lora_export.base_fingerprint"
VERSION = 1
_SAMPLES = 32
_CODE_FLAG = 0x40000000  # adapter versions at or above it are fingerprint codes (ours: 1 before)
_LOSSY_TOLERANCE = 0.5


def _canonical(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(w), dtype="<f4")


def _sample_positions(size: int) -> np.ndarray:
    # Fixed, spread positions (Knuth's multiplicative hash): no PRNG whose stream could change between versions.
    if size == 0:
        return np.zeros(0, np.int64)
    i = np.arange(_SAMPLES, dtype=np.uint64)
    return ((i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(size)).astype(np.int64)


def weight_entry(w: np.ndarray, dtype: str | None = None) -> dict:
    """The fingerprint entry of one base weight, given in ΔW's layout (any float dtype).

    ``dtype``: the dtype the weight is really held in, when ``w`` is a float32 copy (torch's bfloat16)."""
    arr = np.asarray(w)
    flat = _canonical(arr).reshape(-1)
    samples = flat[_sample_positions(flat.size)]
    return {
        "shape": [int(d) for d in arr.shape],
        "dtype": dtype or str(arr.dtype),
        "sha256": hashlib.sha256(memoryview(flat)).hexdigest(),  # no copy: hashed in place
        "samples": base64.b64encode(samples.astype("<f4").tobytes()).decode("ascii"),
    }


def _samples(entry: Mapping) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["samples"]), dtype="<f4")


def entry_problem(
    entry: Mapping, w: np.ndarray, stored_dtype: np.dtype | None = None, lossy: bool = False
) -> str | None:
    """Why the weight ``w`` (ΔW's layout, as the model reads it back) is not the one ``entry`` describes.

    ``stored_dtype``: the dtype the model stores it in (default ``w``'s); ``lossy``: the model stores it
    quantized (``w`` is the dequantized value). None when it matches."""
    arr = np.asarray(w)
    return compare(entry, weight_entry(arr), np.dtype(stored_dtype if stored_dtype is not None else arr.dtype), lossy)


def compare(entry: Mapping, found: Mapping, stored_dtype: np.dtype, lossy: bool = False) -> str | None:
    """``entry_problem`` on the model weight's own entry ``found`` (``weight_entry`` of the weight read back)."""
    if list(found["shape"]) != list(entry["shape"]):
        return f"shape {list(found['shape'])}, the adapter was made for {list(entry['shape'])}"
    if found["sha256"] == entry["sha256"]:
        return None
    want, got = _samples(entry), _samples(found)
    if lossy:
        rel = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-30))
        return None if rel < _LOSSY_TOLERANCE else f"other values (relative difference {rel:.3g} at sampled entries)"
    stored = np.dtype(stored_dtype)
    made = _dtype(entry["dtype"])
    # Stored narrower than the weight the adapter was made on (bfloat16 and float16 hold neither the other):
    # the model holds it rounded, so only the rounded samples can be compared.
    narrower = made is not None and stored != made and stored.itemsize <= made.itemsize
    if narrower and np.array_equal(want.astype(stored), got.astype(stored)):
        return None
    return "other values (sha256 differs)"


def _dtype(name: str) -> np.dtype | None:
    try:
        import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy

        return np.dtype(name)
    except TypeError:
        return None


def combined_sha256(entries: Mapping[str, Mapping]) -> str:
    """One sha256 over the modules' names and weight sha256s (sorted by module)."""
    h = hashlib.sha256()
    for module in sorted(entries):
        h.update(json.dumps([module, entries[module]["sha256"]]).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def short_code(entries: Mapping[str, Mapping]) -> int:
    """The ``.onnx_adapter`` adapter version that stands for these entries (30 bits of their digest)."""
    return _CODE_FLAG | (int(combined_sha256(entries)[:8], 16) & (_CODE_FLAG - 1))


def is_code(adapter_version: int) -> bool:
    """Whether an ``.onnx_adapter``'s adapter version is a fingerprint code (files we wrote before: 1)."""
    return _CODE_FLAG <= adapter_version < 2 * _CODE_FLAG


def encode(entries: Mapping[str, Mapping]) -> str:
    """The stored form (compact JSON, sorted keys)."""
    return json.dumps({"version": VERSION, "targets": dict(entries)}, sort_keys=True, separators=(",", ":"))


def decode(text: str, where: str) -> dict[str, dict]:
    """module → entry, from the stored form; a one-line AdapterError when it is not of the documented shape."""
    bad = AdapterError(f"{where}: corrupt {FINGERPRINT_KEY} metadata; remove it to use the adapter without the check")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise bad from None
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("targets"), dict):
        raise bad
    for entry in data["targets"].values():
        if not _entry_ok(entry):
            raise bad
    return data["targets"]


def _entry_ok(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    shape, sha, samples, dtype = (entry.get(k) for k in ("shape", "sha256", "samples", "dtype"))
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return False
    if not isinstance(sha, str) or len(sha) != 64 or not isinstance(dtype, str) or not isinstance(samples, str):
        return False
    try:
        return len(base64.b64decode(samples, validate=True)) % 4 == 0
    except ValueError:
        return False


def mismatch_line(what: str, module: str, problem: str, against: str, hint: str) -> str:
    """The one-line refusal: ``<what> was made for other base weights: <module>: ...``."""
    return f"{what} was made for other base weights than {against}: {module}: {problem}; {hint}"

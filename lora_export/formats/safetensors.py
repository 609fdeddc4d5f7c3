"""Safetensors read/write on numpy, bfloat16 included (via ml_dtypes), with one-line errors.

safetensors' own numpy loader rejects bfloat16; the format is simple and pickle-free, so we parse the
header ourselves and memory-map the payload.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save as _st_save

from .. import safejson
from ..errors import AdapterError
from ..files.atomic import atomic_write_bytes
from ..files.checks import require_regular_file

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_HEADER_LIMIT = 100 * 1024 * 1024
_MAX_DIMS = 64


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (read-only, memory-mapped) and the ``__metadata__`` of a .safetensors file."""
    path = require_regular_file(path, "safetensors file", AdapterError)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise AdapterError(f"{path}: not a safetensors file (too short)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise AdapterError(f"cannot read {path}: {e.strerror or e}") from None
    (n,) = struct.unpack("<Q", buf[:8])
    if n > min(size - 8, _HEADER_LIMIT):
        raise AdapterError(f"{path}: corrupt or truncated safetensors file (bad header length)")
    try:
        header = safejson.loads(bytes(buf[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{path}: corrupt safetensors file (unparsable header)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: corrupt safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError(f"{path}: corrupt safetensors file (__metadata__ is not an object of strings)")
    start = 8 + n
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype, shape, (lo, hi) = _entry(path, name, info)
        # Python ints: numpy's int64 product wraps around for absurd shapes and would pass the size check.
        count = math.prod(shape)
        if hi - lo != count * dtype.itemsize or lo < 0 or start + hi > size:
            raise AdapterError(f"{path}: corrupt or truncated safetensors file (tensor {name!r})")
        tensors[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=start + lo).reshape(shape)
    return tensors, meta


def _entry(path: Path, name: str, info: object) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    """An entry's dtype, shape and offsets, all checked: JSON integers only, shapes numpy can hold."""
    bad = AdapterError(f"{path}: corrupt safetensors entry {name!r}")
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in _DTYPES:
        raise bad
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise bad
    if not all(_is_int(v) and v >= 0 for v in (*shape, *offsets)):
        raise bad
    # numpy holds at most 64 dimensions and refuses shapes whose nonzero dims (times 8 bytes) pass 2**63,
    # even when a zero dim makes the array empty.
    if len(shape) > _MAX_DIMS or math.prod(max(s, 1) for s in shape) * 8 >= 2**63:
        raise AdapterError(f"{path}: corrupt safetensors entry {name!r} ({len(shape)}-D shape too large for an array)")
    return _DTYPES[info["dtype"]], tuple(shape), (offsets[0], offsets[1])


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors atomically, keys sorted so the same tensors give the same bytes."""
    plain = {}
    bf16 = {}
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        if a.dtype == ml_dtypes.bfloat16:
            bf16[k] = a
        else:
            plain[k] = a
    if not bf16 and len(metadata or {}) <= 1:
        # safetensors' writer orders several metadata keys nondeterministically: those go through _encode.
        atomic_write_bytes(path, _st_save(plain, metadata=metadata))
        return
    atomic_write_bytes(path, _encode(dict(sorted({**plain, **bf16}.items())), metadata))


def _encode(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    names = {v: k for k, v in _DTYPES.items()}
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    blobs = []
    for k, a in tensors.items():
        raw = a.tobytes()
        header[k] = {
            "dtype": names[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)

"""Slot tensors on disk: ONNX Runtime's ``.onnx_adapter`` format and plain ``.safetensors``.

Both hold the same thing, the tensors that fill an injected model's LoRA inputs, named after those
inputs (see ``slots``). ``.onnx_adapter`` files load straight into ONNX Runtime
(``ort.LoraAdapter().Load(path)`` then ``RunOptions.add_active_adapter``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..core.fingerprint import FINGERPRINT_KEY, is_code, short_code
from ..core.fingerprint import decode as decode_fingerprint
from ..core.fingerprint import encode as encode_fingerprint
from ..errors import AdapterError, one_line
from ..files.atomic import atomic_path
from ..files.checks import require_regular_file
from .safetensors import read_safetensors, write_safetensors

ADAPTER_SUFFIXES = (".onnx_adapter", ".safetensors")
MODEL_VERSION_KEY = "lora_export.model_version"


def write_adapter_tensors(
    path: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    *,
    model_version: int = 0,
    adapter_version: int = 1,
    fingerprint: Mapping[str, dict] | None = None,
) -> Path:
    """Write slot tensors atomically; the format follows the suffix (.onnx_adapter or .safetensors).

    ``fingerprint`` (module → entry, see ``lora_export.core.fingerprint``): the base weights the tensors were
    made for; a .safetensors file stores it whole, an .onnx_adapter as its adapter version (a code)."""
    path = Path(path)
    ordered = {k: np.ascontiguousarray(tensors[k]) for k in sorted(tensors)}
    if path.suffix == ".safetensors":
        metadata = {MODEL_VERSION_KEY: str(model_version)}
        if fingerprint:
            metadata[FINGERPRINT_KEY] = encode_fingerprint(fingerprint)
        write_safetensors(path, ordered, metadata=metadata)
        return path
    if fingerprint:
        adapter_version = short_code(fingerprint)
    if path.suffix != ".onnx_adapter":
        raise AdapterError(f"{path}: adapter output must end in .onnx_adapter or .safetensors")
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    # The OrtValues view the numpy buffers: keep ``ordered`` alive until the export is done.
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in ordered.items()})
    with atomic_path(path) as tmp:
        fmt.export_adapter(str(tmp))
    return path


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read slot tensors from a .onnx_adapter or .safetensors file (one-line AdapterError if corrupt)."""
    return read_adapter_file(path)[0]


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, dict] | int | None]:
    """Slot tensors and the base fingerprint the file carries: module → entry (.safetensors), a code
    (.onnx_adapter, see ``fingerprint.short_code``), or None (none; files from other tools)."""
    path = require_regular_file(path, "adapter file", AdapterError)
    if path.suffix == ".safetensors":
        tensors, meta = read_safetensors(path)
        fp = meta.get(FINGERPRINT_KEY)
        return {k: np.array(v) for k, v in tensors.items()}, (None if fp is None else decode_fingerprint(fp, path))
    if path.suffix != ".onnx_adapter":
        raise AdapterError(f"{path}: not an adapter file (.onnx_adapter or .safetensors)")
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = fmt.get_parameters()
        # Copy out: the OrtValues are views of a memory-mapped file.
        tensors = {k: np.array(v.numpy()) for k, v in params.items()}
        version = int(fmt.get_adapter_version())
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for a bad file
        raise AdapterError(f"{path}: not a readable .onnx_adapter file ({one_line(e)})") from None
    return tensors, (version if is_code(version) else None)

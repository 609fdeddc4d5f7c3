"""ONNX model I/O through onnx-ir: lazy, memory-mapped external data; validated; atomic saves.

Tensors we do not change are never materialized in memory: onnx-ir keeps external tensors as
memory-mapped views and streams them to the output when saving.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from .atomic import temp_dir
from .errors import ModelError, first_line
from .model_check import check_model

# Protobuf cannot serialize a message over 2 GiB; stay well under it.
INLINE_LIMIT_BYTES = 1_800_000_000


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model lazily and check its external data references before anything reads them."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model not found: {path}")
    try:
        model = ir.load(path)
    except Exception as e:  # noqa: BLE001 - protobuf raises many types for a corrupt file
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {first_line(e)})") from None
    # An empty (or all-default) protobuf parses as a model with no graph: not an ONNX model at all.
    if not model.ir_version:
        raise ModelError(f"{path}: not an ONNX model (no ir_version; empty or not a model file)")
    check_external_data(model, path)
    check_model(model, path)
    return model


def external_tensors(model: ir.Model) -> Iterator[tuple[ir.Value, ir.ExternalTensor]]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value, value.const_value


def check_external_data(model: ir.Model, path: Path) -> None:
    """Refuse external data outside the model's folder, missing files and out-of-range offsets."""
    root = path.resolve().parent
    sizes: dict[Path, int] = {}
    for value, tensor in external_tensors(model):
        location = Path(tensor.location)
        target = (root / location).resolve()
        if location.is_absolute() or not target.is_relative_to(root):
            raise ModelError(
                f"{path}: external data for {value.name!r} points outside the model's folder ({tensor.location})"
            )
        if target not in sizes:
            if not target.is_file():
                raise ModelError(f"{path}: external data file missing: {tensor.location}")
            sizes[target] = target.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > sizes[target]:
            raise ModelError(
                f"{path}: external data file {tensor.location} is truncated "
                f"(tensor {value.name!r} ends at byte {end}, file has {sizes[target]})"
            )


def external_data_files(model: ir.Model, path: str | os.PathLike) -> set[Path]:
    """The resolved external data files a loaded model reads."""
    root = Path(path).resolve().parent
    return {(root / t.location).resolve() for _, t in external_tensors(model)}


def initializer_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None
    )


def save_model(model: ir.Model, out: str | os.PathLike, *, external: bool | None = None, callback=None) -> list[Path]:
    """Save atomically: nothing appears at ``out`` (or its data file) unless the whole save succeeds.

    ``external``: None keeps the base's choice (external data if the model had any, or if it would not
    fit in one protobuf); True/False forces it. External data goes to ``<out name>.data`` beside it.
    Returns the files written.
    """
    out = Path(out)
    if out.is_dir():
        # os.replace would fail late with a bare IsADirectoryError, after all the work.
        raise ModelError(f"cannot write {out}: it is a directory")
    if external is None:
        external = any(True for _ in external_tensors(model)) or initializer_bytes(model) > INLINE_LIMIT_BYTES
    out.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{out.name}.data"
    with temp_dir(out.parent) as tmp:
        tmp_model = tmp / out.name
        try:
            if external:
                ir.save(model, tmp_model, external_data=data_name, callback=callback)
            else:
                # Without this, external tensors would be saved as references to the base's data file.
                ir.external_data.load_to_model(model)
                ir.save(model, tmp_model)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot write {out}: {type(e).__name__}: {first_line(e)}") from None
        written = []
        if external and (tmp / data_name).exists():
            os.replace(tmp / data_name, out.parent / data_name)
            written.append(out.parent / data_name)
        os.replace(tmp_model, out)
        written.append(out)
    return written

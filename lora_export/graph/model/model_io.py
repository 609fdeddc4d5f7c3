"""ONNX model I/O through onnx-ir: lazy, memory-mapped external data; validated; atomic saves.

Tensors we do not change are never materialized in memory: onnx-ir keeps external tensors as
memory-mapped views and streams them to the output when saving.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx_ir as ir

from lora_export.errors import ModelError, first_line
from lora_export.files.atomic import temp_dir
from lora_export.files.checks import check_output_file, require_regular_file

from .data_file import publish_model
from .external_data import check_external_data, external_data_files, inline_attribute_tensors
from .model_check import check_model
from .provenance import DUPLICATES_META, HISTORY_KEY, duplicate_problem, duplicated_metadata

__all__ = ["check_external_data", "external_data_files", "external_tensors", "load_model", "save_model"]

# Protobuf cannot serialize a message over 2 GiB; stay well under it.
INLINE_LIMIT_BYTES = 1_800_000_000


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model lazily and check its external data references before anything reads them."""
    path = require_regular_file(path, "model", ModelError)
    try:
        model, proto = _load(path)
    except Exception as e:  # noqa: BLE001 - protobuf raises many types for a corrupt file
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {first_line(e)})") from None
    note_duplicates(model, proto, path)
    del proto
    # An empty (or all-default) protobuf parses as a model with no graph: not an ONNX model at all.
    if not model.ir_version:
        raise ModelError(f"{path}: not an ONNX model (no ir_version; empty or not a model file)")
    check_external_data(model, path)
    check_model(model, path)
    return model


def _load(path: Path):
    """``ir.load``, keeping the protobuf: its metadata may hold a key twice, and the IR keeps only the last."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, os.path.dirname(path))
    return model, proto


def note_duplicates(model: ir.Model, proto, path: str | os.PathLike) -> None:
    """Refuse lora_export.* metadata keys the model file holds twice (contradictory provenance); a
    duplicated history goes to ``model.meta`` instead, for ``read_history`` to refuse, so that inspect can
    still describe the model and merge --force can set the entries aside."""
    duplicates = duplicated_metadata([(p.key, p.value) for p in proto.metadata_props])
    for key in sorted(duplicates):
        if key != HISTORY_KEY:
            raise ModelError(f"{path}: {duplicate_problem(duplicates, key)}")
    if duplicates:
        model.meta[DUPLICATES_META] = duplicates


def external_tensors(model: ir.Model) -> Iterator[tuple[ir.Value, ir.ExternalTensor]]:
    """(initializer, external tensor) for the external initializers of every graph and subgraph."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value, value.const_value


def initializer_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None
    )


def save_model(
    model: ir.Model,
    out: str | os.PathLike,
    *,
    external: bool | None = None,
    callback=None,
    keep: Iterable[str | os.PathLike] = (),
) -> list[Path]:
    """Save atomically: nothing appears at ``out`` (or its data file) unless the whole save succeeds,
    and at every instant (kill -9 included) ``out`` is the previous model with its data, or the new one
    with its data (see ``data_file.publish_model``).

    ``external``: None keeps the base's choice (external data if the model had any, or if it would not
    fit in one protobuf); True/False forces it. External data goes to ``<out name>.<content hash>.data``
    beside it. ``keep``: files never removed as the replaced model's data (the inputs). Returns the files
    written, the model last.
    """
    check_outputs(out)
    out = Path(out)
    if external is None:
        external = any(True for _ in external_tensors(model)) or initializer_bytes(model) > INLINE_LIMIT_BYTES
    data_name = f"{out.name}.data"
    inline_attribute_tensors(model)
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
        data = data_name if external and (tmp / data_name).exists() else None
        try:
            return publish_model(tmp, out, data, keep=keep)
        except OSError as e:
            raise ModelError(f"cannot write {out}: {e.strerror or e}") from None


def check_outputs(out: str | os.PathLike) -> None:
    """Refuse, before any work, a model output (or its ``.data``) that is a folder or not a regular file."""
    check_output_file(out, ModelError)
    check_output_file(f"{os.fspath(out)}.data", ModelError)

"""External data of a loaded ONNX model: every tensor the loader may read, checked before any read.

``onnx_ir.load`` resolves locations against the directory of the model path *as given* (not the
resolved file), for initializers and tensor attributes in every subgraph; it leaves tensors inside
model-local functions with no base directory at all (relative to the working directory). Locations
must be relative paths lexically inside that folder; the files there may be symlinks or hard links
(``cp -al`` snapshots, the Hugging Face cache's ``snapshots/<rev>`` → ``blobs/<hash>``), which
onnx-ir 1.1's own containment check refuses, so that check is replaced by ours (see ``_Checked``).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import onnx_ir as ir

from ..errors import ModelError
from ..files.checks import kind_of


def _graph_tensors(graph: ir.Graph | ir.Function, where: str) -> Iterator[tuple[str, ir.TensorProtocol]]:
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.is_ref() or attr.value is None:
                continue
            what = f"attribute {attr.name!r} of node {node.name!r}{where}"
            if attr.type == ir.AttributeType.TENSOR:
                yield what, attr.value
            elif attr.type == ir.AttributeType.TENSORS:
                yield from ((what, t) for t in attr.value)


def all_external_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor]]:
    """(description, tensor) for every external tensor: initializers and tensor attributes of the main
    graph, its subgraphs and the model's functions."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield f"initializer {value.name!r}", value.const_value
    sources: list[tuple[ir.Graph | ir.Function, str]] = [(model.graph, "")]
    sources += [(f, f" in function {f.name!r}") for f in model.functions.values()]
    for graph, where in sources:
        for what, tensor in _graph_tensors(graph, where):
            if isinstance(tensor, ir.ExternalTensor):
                yield what, tensor


def location_error(location: str) -> str | None:
    """Why an external-data location is not a relative path inside the model's folder (None if it is)."""
    if not isinstance(location, str) or not location:
        return "empty location"
    if "\0" in location:
        return "location contains a NUL byte"
    # Backslashes and drive letters as on Windows: a model that escapes its folder there is refused here too.
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
        return "absolute location"
    if ".." in parts:
        return "location leaves the model's folder"
    return None


def _regular_size(path: str) -> int | str:
    """The size of the regular file at ``path`` (links followed), or why it is not one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "file missing"
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        return f"it is a {kind_of(st.st_mode)}, not a regular file"
    return st.st_size


class _Checked(ir.ExternalTensor):
    """An ExternalTensor whose containment check is ours: lexically inside its folder, a regular file;
    symlinks and hard links allowed. If onnx-ir renames its hook, its own stricter check runs instead."""

    __slots__ = ()

    def _check_path_containment(self) -> None:
        why = location_error(self.location)
        if why is None:
            size = _regular_size(self.path)
            why = size if isinstance(size, str) else None
        if why is not None:
            raise ModelError(f"external data {self.location!r}: {why}")


def check_external_data(model: ir.Model, path: str | os.PathLike) -> None:
    """Refuse external data outside the model's folder, missing or non-regular files, out-of-range offsets.

    Checks the locations the loader will open (relative to the folder of ``path`` as given) for every
    external tensor, then lets the loader read them through symlinks and hard links.
    """
    base_dir = os.path.dirname(os.fspath(path))
    sizes: dict[str, int | str] = {}
    for what, tensor in all_external_tensors(model):
        location = tensor.location
        why = location_error(location)
        if why is not None:
            raise ModelError(
                f"{path}: external data for {what} points outside the model's folder ({location!r}, {why})"
            )
        if location not in sizes:
            sizes[location] = _regular_size(os.path.join(base_dir, location))
        size = sizes[location]
        if isinstance(size, str):
            raise ModelError(f"{path}: external data file {location} for {what}: {size}")
        offset, length = tensor.offset or 0, tensor.length if tensor.length is not None else tensor.nbytes
        if offset < 0 or length < 0:
            raise ModelError(f"{path}: external data for {what} has a negative offset or length")
        if offset + length > size:
            raise ModelError(
                f"{path}: external data file {location} is truncated "
                f"({what} ends at byte {offset + length}, file has {size})"
            )
        # Function tensors get no base directory from the loader: pin them to the model's folder too.
        tensor.base_dir = base_dir
        tensor.__class__ = _Checked


def inline_attribute_tensors(model: ir.Model) -> None:
    """Load external tensors held in node attributes (Constant values, in subgraphs and functions) into memory.

    ``onnx_ir.save`` moves only initializers into the new data file: an attribute would keep its old
    location, which next to the output names another file (or a re-laid-out one): wrong numbers.
    """
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for name, attr in list(node.attributes.items()):
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    (value,) = ir.external_data.convert_tensors_from_external([attr.value])
                elif attr.type == ir.AttributeType.TENSORS and any(
                    isinstance(t, ir.ExternalTensor) for t in attr.value
                ):
                    value = ir.external_data.convert_tensors_from_external(list(attr.value))
                else:
                    continue
                node.attributes[name] = ir.Attr(name, attr.type, value, doc_string=attr.doc_string)


def external_data_files(model: ir.Model, path: str | os.PathLike) -> set[Path]:
    """The resolved external data files a loaded model reads."""
    base_dir = os.path.dirname(os.fspath(path))
    return {Path(base_dir, t.location).resolve() for _, t in all_external_tensors(model)}

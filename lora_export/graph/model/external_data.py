"""External data of a loaded ONNX model: every tensor the loader may read, checked before any read.

``onnx_ir.load`` resolves locations against the directory of the model path *as given* (not the
resolved file), for initializers and tensor attributes in every subgraph; it leaves tensors inside
model-local functions with no base directory at all (relative to the working directory). Every location
must pass ONNX Runtime's rule (``files.beside_model``: after resolving links, under the model's folder
or under its real file's folder) and name a regular file. onnx-ir 1.1's own containment check refuses
hard links and the Hugging Face cache layout, which ONNX Runtime accepts, so each tensor's check is
replaced by ours (see ``_Checked``) and runs again right before each read.
"""

from __future__ import annotations

import functools
import mmap
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from lora_export.errors import ModelError
from lora_export.files.beside_model import absolute, outside_reason
from lora_export.files.checks import kind_of


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


# What to do about a location outside the model's folders (ONNX Runtime refuses the model too).
_FIX = "ONNX Runtime refuses it too: put the data file in the model's folder"


def _outside(model_path: str | os.PathLike, location: str) -> str | None:
    why = outside_reason(model_path, location)
    return None if why is None else f"points outside the model's folder ({location!r}, {why}); {_FIX}"


def _problem(model_path: str, location: str, path: str) -> str | None:
    """Why the tensor at ``location`` (opened as ``path``) may not be read for the model at ``model_path``."""
    why = _outside(model_path, location)
    if why is not None:
        return why
    size = _regular_size(path)
    return f"file {location}: {size}" if isinstance(size, str) else None


class _Checked(ir.ExternalTensor):
    """An ExternalTensor whose containment check is ours (``_problem``), run again before every read.
    If onnx-ir renames its hook, its own stricter check runs instead."""

    __slots__ = ()
    _model_path = ""

    def _check_path_containment(self) -> None:
        why = _problem(self._model_path, self.location, self.path)
        if why is not None:
            raise ModelError(f"{self._model_path}: external data {why}")


@functools.lru_cache(maxsize=64)
def _checked_class(model_path: str) -> type[_Checked]:
    # Same slots as ExternalTensor (a class attribute, no instance field), so ``__class__`` can be swapped.
    return type("_Checked", (_Checked,), {"__slots__": (), "_model_path": model_path})


def check_external_data(model: ir.Model, path: str | os.PathLike) -> None:
    """Refuse external data ONNX Runtime would refuse (``files.beside_model``), missing or non-regular
    files, out-of-range offsets.

    Checks the locations the loader will open (relative to the folder of ``path`` as given) for every
    external tensor, then lets the loader read them through the links and hard links the rule allows.
    """
    base_dir = os.path.dirname(os.fspath(path))
    # Absolute, so a later read (and its check) names the same files even if the working directory changes.
    checked, abs_dir = _checked_class(absolute(path)), os.path.dirname(absolute(path))
    sizes: dict[str, int | str] = {}
    for what, tensor in all_external_tensors(model):
        location = tensor.location
        if location not in sizes:
            why = _outside(path, location)
            if why is not None:
                raise ModelError(f"{path}: external data for {what} {why}")
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
        tensor.base_dir = abs_dir
        tensor.__class__ = checked


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


def drop_mapped_pages(value: ir.Value | None) -> None:
    """Unmap from this process the pages of ``value``'s external data that a read mapped in. The bytes stay
    in the page cache, and a later read faults them back in: reading many weights one after another (base
    fingerprints) then holds one weight's pages at a time, not all of them (they count in the RSS)."""
    tensor = value.const_value if value is not None else None
    raw = tensor.raw if isinstance(tensor, ir.ExternalTensor) else None
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if raw is None or advice is None or tensor.nbytes == 0:
        return
    offset = tensor.offset or 0
    start = offset - offset % mmap.PAGESIZE
    try:
        raw.madvise(advice, start, min(offset + tensor.nbytes, len(raw)) - start)
    except (OSError, ValueError):  # a mapping that cannot take the advice keeps its pages: only memory is at stake
        pass

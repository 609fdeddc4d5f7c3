"""Content-named external data files: ``<model>.<16 hex of the content digest>.data`` beside ``<model>``.

A name unique per content is what lets a model and its data be replaced as one unit
(``files.publish.publish_set``): the new data never takes the old data's name while the old model
still reads it. Same bytes give the same name, so outputs stay byte-deterministic.

The digest is XXH3-128, not sha256: the name only has to tell contents apart (64 bits of it are
kept, as they were of sha256), and sha256 of a 650 MB data file took 0.5 s, longer than copying the
file in the kernel; XXH3 over a read-only mapping of it takes ~0.07 s (2-core EPYC VM, page cache).
Integrity is sha256's job elsewhere (build manifests, base fingerprints).
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import onnx
import xxhash

from lora_export.files.publish import publish_set

_HASH_CHARS = 16
_WINDOW = 16 * 1024 * 1024  # a multiple of every mmap.ALLOCATIONGRANULARITY


class _HasBytes(Protocol):
    def tobytes(self) -> bytes: ...


def content_data_name(model_name: str, data_path: Path) -> str:
    """The data file name for ``model_name`` whose bytes are those of ``data_path``."""
    return data_name_for(model_name, content_digest(data_path))


def data_name_for(model_name: str, digest_hex: str) -> str:
    """The data file name for ``model_name`` whose bytes have this ``content_digest`` (a writer that
    hashed them as it wrote them need not read them again)."""
    return f"{model_name}.{digest_hex[:_HASH_CHARS]}.data"


def content_digest(path: str | os.PathLike, patches: Sequence[tuple[int, bytes | _HasBytes]] = ()) -> str:
    """The content digest (hex) of the bytes of the file at ``path`` with each ``(offset, data)`` patch
    written over them (sorted, disjoint, inside the file), as if the patched file had been written:
    hashed from read-only mappings of the file, so its bytes are never copied into Python. ``data``:
    bytes, or a tensor whose ``tobytes()`` is taken one patch at a time (memory stays flat)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        for offset, patch in patches:
            data = patch.tobytes() if hasattr(patch, "tobytes") else patch
            _hash_range(h, f.fileno(), pos, offset)
            h.update(data)
            pos = offset + len(data)
        _hash_range(h, f.fileno(), pos, size)
    return h.hexdigest()


def _hash_range(h: xxhash.xxh3_128, fd: int, lo: int, hi: int) -> None:
    # One window mapped at a time: a whole-file mapping would count the file in the process's RSS.
    # MAP_POPULATE reads each window in ahead of the hash (Linux); elsewhere pages fault in as read.
    populate = getattr(mmap, "MAP_POPULATE", 0)
    start = lo - lo % mmap.ALLOCATIONGRANULARITY
    while start < hi:
        length = min(_WINDOW, hi - start)
        if populate:
            mapped = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ, offset=start)
        else:
            mapped = mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=start)
        with mapped, memoryview(mapped) as view:
            h.update(view[max(lo - start, 0) :])
        start += length


def is_own_data_name(model_name: str, name: str) -> bool:
    """Whether ``name`` is a data file name this tool gives ``model_name`` (content-named, or the
    ``<model>.data`` of earlier versions)."""
    return re.fullmatch(rf"{re.escape(model_name)}(\.[0-9a-f]{{{_HASH_CHARS}}})?\.data", name) is not None


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
        for sparse in attr.sparse_tensors:
            yield from (sparse.values, sparse.indices)
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for g in attr.graphs:
            yield from _tensors(g)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _tensors(model.graph)
    for func in model.functions:
        for node in func.node:
            yield from _node_tensors(node)


def _locations(model: onnx.ModelProto) -> Iterator[onnx.StringStringEntryProto]:
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield from (e for e in tensor.external_data if e.key == "location")


def rename_data_file(model_path: Path, old: str, new: str) -> None:
    """Point every external tensor of the model file at ``model_path`` from data file ``old`` to ``new``
    (the file itself is renamed by the caller). Other fields keep their bytes."""
    proto = onnx.load_model(os.fspath(model_path), load_external_data=False)
    for entry in _locations(proto):
        if entry.value == old:
            entry.value = new
    model_path.write_bytes(proto.SerializeToString())


def referenced_data_files(model_path: Path) -> set[str]:
    """The external-data locations the model file at ``model_path`` names (empty if it is unreadable)."""
    try:
        proto = onnx.load_model(os.fspath(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - whatever is there, it is not a model whose data we could own
        return set()
    return {e.value for e in _locations(proto)}


def obsolete_data_files(dest: Path) -> list[str]:
    """The data files of the model now at ``dest`` that this tool named: they go when a new model with
    other data replaces it. Unreadable or foreign models give none (nothing else is ever removed)."""
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return []
    if not any(is_own_data_name(dest.name, n) for n in names) or not dest.is_file() or dest.is_symlink():
        return []
    return sorted(n for n in referenced_data_files(dest) if is_own_data_name(dest.name, n) and n in names)


def publish_model(
    stage: Path,
    out: Path,
    data: str | None = None,
    *,
    keep: Iterable[str | os.PathLike] = (),
    named: bool = False,
) -> list[Path]:
    """The atomic model-and-data writer: publish ``stage/<out.name>`` (and its data file ``stage/<data>``,
    renamed here to its content name) at ``out`` as one unit, then remove the data files of the model it
    replaced (those this tool named, other than ``keep``, e.g. the inputs being read).

    ``stage`` is a staging folder in ``out``'s folder (``files.atomic.temp_dir(out.parent)``). At every
    instant, kill -9 included, ``out``'s folder holds nothing, the complete previous model or the complete
    new one (``files.publish.publish_set``). Returns the written paths, the model last. ``named``: ``data``
    already has its content name (``data_name_for``) and the model already reads it by that name.
    """
    companions = [data] if named and data is not None else []
    if data is not None and not named:
        name = content_data_name(out.name, stage / data)
        os.rename(stage / data, stage / name)
        rename_data_file(stage / out.name, data, name)
        companions = [name]
    kept = [Path(k) for k in keep if os.path.exists(k)]
    obsolete = [n for n in obsolete_data_files(out) if not any(os.path.samefile(out.parent / n, k) for k in kept)]
    return publish_set(stage, out.name, companions, out.parent, obsolete=obsolete)

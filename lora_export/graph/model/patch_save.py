"""Fast save for merges: copy the base's external data file and overwrite only the merged tensors.

A merge changes a few tensors without changing their size, dtype or shape, so the output's data file
is the base's with some byte ranges rewritten. Copying the file (``copy_file_range``: a reflink where
the filesystem shares extents, an in-kernel copy elsewhere) and patching those ranges costs about one
plain copy, instead of re-serializing every tensor through Python. Tensor offsets are kept, so the
result is byte-deterministic like any save.

The output's data file is named after its content digest (``data_file``). A second thread hashes the
output's bytes (the base's, with the patches in place) from a mapping of the base file while the copy
runs, so the name is known when the copy ends and the file is never read back.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from pathlib import Path

import onnx_ir as ir

from lora_export.errors import ModelError
from lora_export.files.atomic import temp_dir
from lora_export.files.beside_model import outside_reason

from .data_file import content_digest, data_name_for, publish_model
from .external_data import inline_attribute_tensors
from .model_io import check_outputs, external_tensors

Snapshot = dict[int, tuple[ir.Value, ir.ExternalTensor]]
INLINE_PATCH_LIMIT = 256 * 1024 * 1024
_COPY_STEP = 256 * 1024 * 1024  # between steps, a copy no longer needed can stop
# copy_file_range cannot serve this pair of files (another filesystem, an old kernel): copy another way.
_NO_RANGE_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def snapshot(model: ir.Model) -> Snapshot:
    """The external tensors of a freshly loaded model, to tell later which ones were replaced."""
    return {id(v): (v, t) for v, t in external_tensors(model)}


def save_patched(
    model: ir.Model,
    base_path: str | os.PathLike,
    out: str | os.PathLike,
    before: Snapshot,
    keep: Iterable[Path] = (),
    early: EarlyCopy | None = None,
):
    """Save ``model`` to ``out`` by patching a copy of the base's data file; None if not applicable.

    Applies when all external data lives in one file and every replaced external tensor kept its
    byte size. Atomic like ``save_model``: nothing appears at ``out`` unless everything succeeds, and
    a crash never leaves the model beside another save's data (``data_file.publish_model``).
    ``early``: the copy ``start_copy`` began for this save (its staging folder is used).
    """
    src = _single_source(base_path, before)
    if src is None:
        return None
    changed = []
    for value, old in before.values():
        new = value.const_value
        if new is old:
            continue
        if new is None or new.nbytes != old.nbytes or (old.length is not None and old.length != old.nbytes):
            return None
        changed.append((old, new))
    # New tensors (a tied weight's private merged copy) are saved inline: fine while small, but a
    # protobuf cannot exceed 2 GiB, so large ones take the full external-data save instead.
    inline = sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if id(v) not in before and v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )
    if inline > INLINE_PATCH_LIMIT:
        return None
    check_outputs(out)
    inline_attribute_tensors(model)
    out = Path(out)
    patches = sorted(((old.offset or 0, new) for old, new in changed), key=lambda p: p[0])
    with nullcontext(early.tmp) if early is not None else temp_dir(out.parent) as tmp:
        try:
            staged = tmp / f"{out.name}.data"
            if early is not None:
                digest = early.finish(patches)
            else:
                digest = copy_patched(src, staged, patches)
            data_name = data_name_for(out.name, digest)
            os.rename(staged, tmp / data_name)
            for value, old in before.values():
                value.const_value = ir.ExternalTensor(
                    data_name,
                    old.offset,
                    old.length,
                    old.dtype,
                    shape=old.shape,
                    name=old.name,
                    base_dir=tmp,
                )
            ir.save(model, tmp / out.name)
            return publish_model(tmp, out, data_name, keep=keep, named=True)
        except OSError as e:
            raise ModelError(f"cannot write {out}: {e.strerror or e}") from None


def _single_source(base_path: str | os.PathLike, before: Snapshot) -> str | None:
    """The one data file the external tensors in ``before`` read (None if several)."""
    # The copy reads the whole file outside onnx-ir: checked again here, as each tensor read is.
    for location in sorted({t.location for _, t in before.values()}):
        why = outside_reason(base_path, location)
        if why is not None:
            raise ModelError(f"{base_path}: external data points outside the model's folder ({location!r}, {why})")
    # The paths the loader reads (relative to the model path as given, links allowed), not re-derived.
    files = {os.path.realpath(t.path) for _, t in before.values()}
    return next(iter(files)) if len(files) == 1 else None


class EarlyCopy:
    """The base's data file being copied (in the kernel, on a thread) into the staging folder of ``out``
    while the merge is computed: the copy, the largest cost of a merge after start-up, overlaps the
    work that decides the patches. Made by ``start_copy``; the staging folder and the thread end with
    the ``ExitStack`` given there (an unfinished copy is stopped between chunks)."""

    def __init__(self, stack: ExitStack, src: str, out: Path):
        self.src, self.tmp = src, stack.enter_context(temp_dir(out.parent))
        self.staged = self.tmp / f"{out.name}.data"
        pool = ThreadPoolExecutor(max_workers=1)
        stack.callback(pool.shutdown)
        self._stop = threading.Event()
        stack.callback(self._stop.set)  # runs first: a copy still going stops before the folder goes
        self._copy = pool.submit(_copy_file, src, self.staged, self._stop)

    def finish(self, patches: Sequence[tuple[int, ir.TensorProtocol]]) -> str:
        """Write the patches over the finished copy; return its content digest (hashed meanwhile)."""
        digest = content_digest(self.src, patches)
        self._copy.result()
        _write_patches(self.staged, patches)
        return digest


def start_copy(stack: ExitStack, base_path: str | os.PathLike, out: str | os.PathLike, before: Snapshot):
    """Begin copying the base's data file for a ``save_patched`` of ``out`` (None where that save
    cannot apply: no external data, or several data files)."""
    src = _single_source(base_path, before) if before else None
    if src is None:
        return None
    check_outputs(out)
    return EarlyCopy(stack, src, Path(out))


def copy_patched(src: str | os.PathLike, dst: Path, patches: Sequence[tuple[int, ir.TensorProtocol]]) -> str:
    """Write ``dst`` as ``src`` with each ``(offset, tensor)`` patch's bytes written over it (sorted,
    disjoint, inside the file); return the content digest (``data_file.content_digest``) of ``dst``'s
    bytes, hashed from ``src`` during the copy. Each patch's bytes exist only while they are hashed or
    written (memory stays flat)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(content_digest, src, patches)
        _copy_file(src, dst)
        _write_patches(dst, patches)
        return digest.result()


def _write_patches(dst: Path, patches: Sequence[tuple[int, ir.TensorProtocol]]) -> None:
    with open(dst, "r+b") as f:
        for offset, tensor in patches:
            f.seek(offset)
            f.write(tensor.tobytes())


def _copy_file(src: str | os.PathLike, dst: Path, stop: threading.Event | None = None) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size, done = os.fstat(fin.fileno()).st_size, 0
        try:
            while done < size:
                if stop is not None and stop.is_set():
                    return
                n = os.copy_file_range(fin.fileno(), fout.fileno(), min(size - done, _COPY_STEP))
                if n == 0:
                    break
                done += n
        except OSError as e:
            if e.errno not in _NO_RANGE_COPY or done:
                raise
        else:
            if done == size:
                return
    shutil.copyfile(src, dst)

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
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
# copy_file_range cannot serve this pair of files (another filesystem, an old kernel): copy another way.
_NO_RANGE_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def snapshot(model: ir.Model) -> Snapshot:
    """The external tensors of a freshly loaded model, to tell later which ones were replaced."""
    return {id(v): (v, t) for v, t in external_tensors(model)}


def save_patched(
    model: ir.Model, base_path: str | os.PathLike, out: str | os.PathLike, before: Snapshot, keep: Iterable[Path] = ()
):
    """Save ``model`` to ``out`` by patching a copy of the base's data file; None if not applicable.

    Applies when all external data lives in one file and every replaced external tensor kept its
    byte size. Atomic like ``save_model``: nothing appears at ``out`` unless everything succeeds, and
    a crash never leaves the model beside another save's data (``data_file.publish_model``).
    """
    # The copy reads the whole file outside onnx-ir: checked again here, as each tensor read is.
    for location in sorted({t.location for _, t in before.values()}):
        why = outside_reason(base_path, location)
        if why is not None:
            raise ModelError(f"{base_path}: external data points outside the model's folder ({location!r}, {why})")
    # The paths the loader reads (relative to the model path as given, links allowed), not re-derived.
    files = {os.path.realpath(t.path) for _, t in before.values()}
    if len(files) != 1:
        return None
    (src,) = files
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
    with temp_dir(out.parent) as tmp:
        try:
            staged = tmp / f"{out.name}.data"
            data_name = data_name_for(out.name, copy_patched(src, staged, patches))
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


def copy_patched(src: str | os.PathLike, dst: Path, patches: Sequence[tuple[int, ir.TensorProtocol]]) -> str:
    """Write ``dst`` as ``src`` with each ``(offset, tensor)`` patch's bytes written over it (sorted,
    disjoint, inside the file); return the content digest (``data_file.content_digest``) of ``dst``'s
    bytes, hashed from ``src`` during the copy. Each patch's bytes exist only while they are hashed or
    written (memory stays flat)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(content_digest, src, patches)
        _copy_file(src, dst)
        with open(dst, "r+b") as f:
            for offset, tensor in patches:
                f.seek(offset)
                f.write(tensor.tobytes())
        return digest.result()


def _copy_file(src: str | os.PathLike, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size, done = os.fstat(fin.fileno()).st_size, 0
        try:
            while done < size:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done)
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

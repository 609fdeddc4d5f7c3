"""Atomic file output: write to a temporary sibling, then rename, so no half-written file is ever seen."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import AdapterError, LoraExportError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def temp_dir(parent: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary folder inside ``parent`` (same filesystem, so renames out of it are atomic)."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix=".lora-export-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_overwrite(
    outputs: Iterable[str | os.PathLike],
    inputs: Iterable[str | os.PathLike],
    error: type[LoraExportError] = AdapterError,
) -> None:
    """Refuse outputs that are one of the inputs (same path, or the same file through a link).

    A rename over an input would replace the very file being read: inputs must stay byte-identical.
    """
    ins = [Path(i).resolve() for i in inputs]
    for out in outputs:
        o = Path(out).resolve()
        for i in ins:
            if o == i or (o.exists() and i.exists() and o.samefile(i)):
                raise error(f"refusing to write {out}: it would overwrite the input {i}")

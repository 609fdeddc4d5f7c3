"""Atomic file output: write to a temporary sibling, then rename, so no half-written file is ever seen."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import AdapterError, LoraExportError
from .checks import check_output_file
from .staging import file_mode, staging_dir


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it.

    The file gets the mode a plain ``open()`` would give it (umask honoured), whatever wrote it.
    """
    path = Path(path)
    check_output_file(path)
    with staging_dir(path.parent) as stage:
        tmp = stage / path.name
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def temp_dir(parent: str | os.PathLike) -> Iterator[Path]:
    """A hidden, locked temporary folder inside ``parent`` (same filesystem, so renames out of it are atomic).

    A folder left behind by a killed run is removed by the next run writing into ``parent``. ``parent``
    is created if needed, and removed again (with the parents created for it) when the block fails.
    """
    with staging_dir(parent) as stage:
        yield stage


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

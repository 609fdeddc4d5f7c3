"""The build's content-hash cache: one folder per built artifact, named by the sha256 of everything that
went into it (input file contents, the recipe's section for it, the tool's version), holding the files
and ``entry.json`` (their sha256 and sizes, provenance, verification figures).

An entry appears by one rename of a complete folder, so a killed build leaves no half entry; an entry
whose files no longer match their recorded sha256 (edited through a hard link from DIST) is ignored and
rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

ENTRY = "entry.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_digest(files: Iterable[tuple[str, Path]]) -> str:
    """sha256 over (label, content sha256) pairs, in the given order."""
    h = hashlib.sha256()
    for label, path in files:
        h.update(f"{label}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def key_of(parts: dict) -> str:
    """The cache key of an artifact: sha256 of its description as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def folder_files(root: Path) -> dict[str, dict]:
    """Every regular file under ``root`` (relative POSIX path → sha256 and size), sorted."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = {"sha256": file_sha256(p), "size": p.stat().st_size}
    return dict(sorted(out.items()))


def lookup(cache: Path, key: str) -> dict | None:
    """The entry for ``key`` when it is complete and its files are intact; else None."""
    folder = cache / key
    try:
        entry = json.loads((folder / ENTRY).read_text(encoding="utf-8"))
        files = entry["files"]
        for rel, info in files.items():
            p = folder / "files" / rel
            if p.is_symlink() or p.stat().st_size != info["size"] or file_sha256(p) != info["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return entry


@contextlib.contextmanager
def new_entry(cache: Path, key: str) -> Iterator[Path]:
    """A temporary folder in ``cache`` to build the files of ``key`` in (``<tmp>/files``); the caller writes
    ``<tmp>/entry.json`` last (``write_entry``); with it, the folder becomes ``cache/<key>`` in one rename,
    without it (a failed verification, an error) the folder is removed."""
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        (tmp / "files").mkdir()
        yield tmp
        if not (tmp / ENTRY).is_file():
            return
        final = cache / key
        if final.exists():  # a broken entry (or a concurrent build's): replace it
            aside = Path(tempfile.mkdtemp(prefix=".old-", dir=cache))
            os.rename(final, aside / "x")
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_entry(tmp: Path, entry: dict) -> None:
    """Record the entry's description; its ``files`` are listed from ``tmp/files``."""
    entry = {**entry, "files": folder_files(tmp / "files")}
    (tmp / ENTRY).write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n", encoding="utf-8")

"""What kind of file a path names, checked before anything opens it or is renamed over it.

A FIFO opened for reading blocks until someone writes to it, and a rename over a device or a folder
fails late (or replaces something that is not ours): inputs must be regular files, outputs regular
files or new paths.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import LoraExportError

_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def kind_of(mode: int) -> str:
    """A human name for the file type in ``mode`` ("regular file", "FIFO", ...)."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def require_regular_file(
    path: str | os.PathLike, what: str = "file", error: type[LoraExportError] = LoraExportError
) -> Path:
    """``path`` as a Path if it is a regular file (after following links); else a one-line ``error``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except ValueError:  # an embedded NUL byte
        raise error(f"{what}: invalid path {os.fspath(path)!r}") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is a {kind_of(st.st_mode)}, not a regular file")
    return Path(path)


def check_output_file(path: str | os.PathLike, error: type[LoraExportError] = LoraExportError) -> None:
    """Refuse an output path that names a folder (or ends in '/') or an existing non-regular file."""
    raw = os.fspath(path)
    if raw.endswith(os.sep) or (os.altsep and raw.endswith(os.altsep)):
        raise error(f"cannot write {raw}: it names a folder; give a file name")
    try:
        st = os.stat(raw)
    except FileNotFoundError:
        return
    except ValueError:
        raise error(f"cannot write {raw!r}: invalid path") from None
    except OSError as e:
        raise error(f"cannot write {raw}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"cannot write {raw}: it is a {kind_of(st.st_mode)} (outputs must be regular files or new paths)")

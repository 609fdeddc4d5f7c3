"""Hidden staging folders beside an output, proven to be ours, and removed again by the next run when a
killed run left them.

Every write goes through a staging folder ``.lora-export-<12 hex>/`` in the output's own folder (same
filesystem, so renames out of it are atomic). A run holds an ``fcntl.flock`` on its
``.lora-export-<12 hex>.lock`` for as long as the folder exists. Both carry a proof: the lock file holds
``_MAGIC`` and the token, and so does the marker file inside the folder. A later run in the same
folder removes only staging entries that prove themselves ours and whose lock it can take (those of a
killed run); a user's own ``.lora-export-notes/`` is never touched. Removal never follows a symlink and
never enters another filesystem mounted inside.

The lock is created complete (content written, lock taken) before it gets its name, through an
unnamed ``O_TMPFILE`` inode where the filesystem has them; elsewhere it is written as ``.locking`` and
renamed, and an empty or proven ``.locking`` of a dead run is removed too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from .journal import recover

try:
    import fcntl
except ImportError:  # not POSIX: no locks, and leftovers are never removed
    fcntl = None

STAGE_PREFIX = ".lora-export-"
MARKER_NAME = ".lora-export-stage"
_MAGIC = "lora-export staging folder\n"
_LOCK_SUFFIX = ".lock"
# Without O_TMPFILE a lock is created under this suffix and renamed once locked, so a cleaner never sees
# a ``.lock`` unlocked.
_NEW_LOCK_SUFFIX = ".locking"
_TOKEN = re.compile(rf"{re.escape(STAGE_PREFIX)}[0-9a-f]{{12}}")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file (0644 under umask 022)."""
    return 0o666 & ~umask()


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _proof(token: str) -> bytes:
    return f"{_MAGIC}{token}\n".encode()


def _read_small(path: Path, limit: int = 256) -> bytes | None:
    """The bytes of a small regular file, never through a symlink; None if it is anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _proven(path: Path, token: str) -> bool:
    return _read_small(path) == _proof(token)


def is_stage_entry(parent: str | os.PathLike, name: str) -> bool:
    """Whether ``parent/name`` is a staging entry this tool made (a proven lock, or a folder with a proven
    marker or lock): the only ``.lora-export-*`` entries any cleanup may remove or skip."""
    parent = Path(parent)
    token = name.removesuffix(_LOCK_SUFFIX).removesuffix(_NEW_LOCK_SUFFIX)
    if not _TOKEN.fullmatch(token):
        return False
    if name != token:
        return _proven(parent / name, token)
    return _proven(parent / f"{token}{_LOCK_SUFFIX}", token) or _proven(parent / name / MARKER_NAME, token)


def mount_points() -> set[str]:
    """The mount points of this process's namespace (empty where /proc is missing)."""
    points = set()
    with contextlib.suppress(OSError):
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    # Spaces, tabs, newlines and backslashes in paths are escaped as octal.
                    points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def has_mounts(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a mount point or has one anywhere inside (a folder swap would copy or move it)."""
    real = os.path.realpath(folder)
    if os.path.ismount(real):
        return True
    inside = real.rstrip("/") + "/"
    return any(p == real or p.startswith(inside) for p in mount_points())


def remove_tree(path: str | os.PathLike) -> bool:
    """Remove ``path`` (a file or a folder this tool made) and what is in it, never following a symlink
    and never entering a filesystem mounted inside; True when it is gone.

    A folder's own marker goes last, so a folder interrupted half-way still proves whose it is."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    mounts = mount_points()
    try:
        return _remove(os.path.realpath(path.parent), path.name, None, st.st_dev, mounts)
    except (OSError, RecursionError):
        return False


def _remove(where: str, name: str, dir_fd: int | None, dev: int, mounts: set[str]) -> bool:
    st = os.lstat(name, dir_fd=dir_fd) if dir_fd is not None else os.lstat(os.path.join(where, name))
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd) if dir_fd is not None else os.unlink(os.path.join(where, name))
        return True
    full = os.path.join(where, name)
    if st.st_dev != dev or full in mounts:
        return False  # another filesystem mounted here: not ours to empty
    fd = os.open(name if dir_fd is not None else full, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=dir_fd)
    try:
        done = [_remove(full, n, fd, dev, mounts) for n in os.listdir(fd) if n != MARKER_NAME]
        if all(done) and os.path.lexists(os.path.join(full, MARKER_NAME)):
            done.append(_remove(full, MARKER_NAME, fd, dev, mounts))
    finally:
        os.close(fd)
    if not all(done):
        return False
    os.rmdir(name, dir_fd=dir_fd) if dir_fd is not None else os.rmdir(full)
    return True


def clean_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove the staging entries in ``parent`` that prove they are ours and that no live run holds the
    lock of (after finishing or undoing what their run was publishing); returns the folders removed."""
    parent = Path(parent)
    removed = []
    try:
        names = [e.name for e in os.scandir(parent) if e.name.startswith(STAGE_PREFIX)]
    except OSError:
        return removed
    for name in names:
        if not name.endswith(_NEW_LOCK_SUFFIX) or not _TOKEN.fullmatch(name.removesuffix(_NEW_LOCK_SUFFIX)):
            continue
        # Created without O_TMPFILE: empty if its run died before writing the proof (nothing of value).
        path = parent / name
        if _read_small(path) in (b"", _proof(name.removesuffix(_NEW_LOCK_SUFFIX))) and _unlocked(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    tokens = {n.removesuffix(_LOCK_SUFFIX) for n in names if n.endswith(_LOCK_SUFFIX)}
    for name in names:
        stage = parent / name
        if not _TOKEN.fullmatch(name) or name in tokens:
            continue
        # No lock: its run died while removing it (the lock goes last). Only a proven marker makes it ours.
        if _proven(stage / MARKER_NAME, name) and not os.path.lexists(parent / f"{name}{_LOCK_SUFFIX}"):
            recover(stage)
            if remove_tree(stage):
                removed.append(stage)
    for token in tokens:
        lock = parent / f"{token}{_LOCK_SUFFIX}"
        if not _TOKEN.fullmatch(token) or not _proven(lock, token):
            continue
        try:
            fd = os.open(lock, os.O_RDWR | _NOFOLLOW)
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue  # a live run, or no locks on this platform
            stage = parent / token
            if os.path.lexists(stage):
                if not stat.S_ISDIR(os.lstat(stage).st_mode):
                    continue
                recover(stage)
                if not remove_tree(stage):
                    continue  # keep the lock: the folder must stay provably ours
                removed.append(stage)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        finally:
            os.close(fd)
    return removed


def _unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | _NOFOLLOW)
    except OSError:
        return False
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)


def _create_lock(parent: Path, token: str) -> int:
    """An open, locked file at ``parent/<token>.lock`` holding the proof; it never exists without both."""
    lock = parent / f"{token}{_LOCK_SUFFIX}"
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(parent, os.O_TMPFILE | os.O_RDWR, 0o600)
        try:
            os.write(fd, _proof(token))
            _try_lock(fd)
            _name_fd(fd, lock)
            return fd
        except OSError:
            os.close(fd)
    new_lock = parent / f"{token}{_NEW_LOCK_SUFFIX}"
    fd = os.open(new_lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    try:
        os.write(fd, _proof(token))
        _try_lock(fd)
        os.replace(new_lock, lock)
    except BaseException:
        with contextlib.suppress(OSError):
            new_lock.unlink()
        os.close(fd)
        raise
    return fd


_AT_FDCWD, _AT_EMPTY_PATH = -100, 0x1000


def _name_fd(fd: int, path: Path) -> None:
    """Give the unnamed (``O_TMPFILE``) inode open as ``fd`` the name ``path``."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        # linkat(fd, "", AT_EMPTY_PATH): needs CAP_DAC_READ_SEARCH; the /proc way below does not.
        if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(path), _AT_EMPTY_PATH) == 0:
            return
    os.link(f"/proc/self/fd/{fd}", path)  # linkat(AT_SYMLINK_FOLLOW) on the fd's /proc entry


def make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, the deepest first."""
    missing = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except BaseException:
        remove_empty_dirs(missing)
        raise
    return missing


def remove_empty_dirs(created: list[Path]) -> None:
    """Undo ``make_dirs`` after a failure: remove the folders it created, as long as they are empty."""
    for d in created:
        if not os.path.lexists(d):
            continue  # never made (the failure was making it)
        try:
            os.rmdir(d)
        except OSError:
            return


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike) -> Iterator[Path]:
    """A new, locked, hidden folder in ``parent``; removed (with whatever is left in it) on exit.

    Stale staging folders of killed runs in ``parent`` are removed first. ``parent`` and its missing
    parents are created; on failure those created are removed again (when empty).
    """
    parent = Path(parent)
    created = make_dirs(parent)
    try:
        with _stage(parent) as stage:
            yield stage
    except BaseException:
        remove_empty_dirs(created)
        raise


@contextlib.contextmanager
def _stage(parent: Path) -> Iterator[Path]:
    clean_stale(parent)
    token = f"{STAGE_PREFIX}{secrets.token_hex(6)}"
    lock = parent / f"{token}{_LOCK_SUFFIX}"
    fd = _create_lock(parent, token)
    try:
        stage = parent / token
        try:
            os.mkdir(stage, 0o700)
            (stage / MARKER_NAME).write_bytes(_proof(token))
            yield stage
        finally:
            if remove_tree(stage):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
    finally:
        os.close(fd)

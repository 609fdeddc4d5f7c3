"""Hidden staging folders beside an output, and the renames that publish what was built in them.

Every write goes through a staging folder ``.lora-export-<token>/`` in the output's own folder (same
filesystem, so renames out of it are atomic). A run holds an ``fcntl.flock`` on its
``.lora-export-<token>.lock`` for as long as the folder exists; a later run in the same folder removes
staging folders whose lock it can take, i.e. those left behind by a killed run (they can be large).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks, and leftovers are never removed
    fcntl = None

STAGE_PREFIX = ".lora-export-"
_LOCK_SUFFIX = ".lock"
# A lock file is created under this suffix and renamed once locked, so a cleaner never sees it unlocked.
_NEW_LOCK_SUFFIX = ".locking"


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


def clean_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove the staging folders in ``parent`` that no live run holds the lock of; returns them."""
    parent = Path(parent)
    removed = []
    try:
        names = [e.name for e in os.scandir(parent) if e.name.startswith(STAGE_PREFIX)]
    except OSError:
        return removed
    tokens = {n[: -len(_LOCK_SUFFIX)] for n in names if n.endswith(_LOCK_SUFFIX)}
    for name in names:
        path = parent / name
        if name.endswith(_LOCK_SUFFIX) or name.endswith(_NEW_LOCK_SUFFIX) or name in tokens:
            continue
        # A lock is created before its folder and removed after it: a folder without one (checked again
        # now, the listing is no snapshot) was being removed when its run died. Finish the job.
        if os.path.lexists(parent / f"{name}{_LOCK_SUFFIX}"):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for token in tokens:
        lock = parent / f"{token}{_LOCK_SUFFIX}"
        try:
            fd = os.open(lock, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue  # a live run, or no locks on this platform
            stage = parent / token
            if stage.is_dir() and not stage.is_symlink():
                shutil.rmtree(stage, ignore_errors=True)
                removed.append(stage)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike) -> Iterator[Path]:
    """A new, locked, hidden folder in ``parent``; removed (with whatever is left in it) on exit.

    Stale staging folders of killed runs in ``parent`` are removed first.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent)
    token = f"{STAGE_PREFIX}{secrets.token_hex(6)}"
    new_lock = parent / f"{token}{_NEW_LOCK_SUFFIX}"
    lock = parent / f"{token}{_LOCK_SUFFIX}"
    fd = os.open(new_lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _try_lock(fd)
        os.replace(new_lock, lock)
        stage = parent / token
        os.mkdir(stage, 0o700)
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    finally:
        with contextlib.suppress(FileNotFoundError):
            new_lock.unlink()
        os.close(fd)


def publish_files(stage: Path, names: Sequence[str], dest_dir: Path) -> list[Path]:
    """Move ``names`` from ``stage`` into ``dest_dir`` so that a crash never pairs old and new files.

    The last name is the one that refers to the others (the model; before it, its data file): the old
    one is removed first, then the others are renamed in, then it. A crash leaves either no such file
    or the new one beside its new companions.
    """
    *companions, main = names
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest_dir / main)
    for name in companions:
        os.replace(stage / name, dest_dir / name)
    os.replace(stage / main, dest_dir / main)
    return [dest_dir / n for n in names]


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2); False where it is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # an old kernel, or a filesystem without exchange
    raise OSError(err, os.strerror(err), str(b))


def swap_dir(new: Path, dest: Path, aside: Path) -> None:
    """Make the folder ``new`` appear at ``dest`` in one step; an old ``dest`` ends up at ``new`` or ``aside``.

    ``new`` and ``aside`` are inside a staging folder on the same filesystem, which the caller removes.
    """
    if not os.path.lexists(dest):
        os.rename(new, dest)
        return
    if _renameat2_exchange(new, dest):
        return  # ``new`` now names the old folder
    # No exchange: for a moment there is no folder at ``dest``, never a mixed one.
    os.rename(dest, aside)
    os.rename(new, dest)


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (cheap, same filesystem); copy where links are not possible."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Bring the entries of folder ``old`` that are not in ``skip`` into folder ``new`` (links, not copies)."""
    for entry in os.scandir(old):
        if entry.name in skip or entry.name.startswith(STAGE_PREFIX):
            continue
        target = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            shutil.copytree(entry.path, target, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry.path, str(target))

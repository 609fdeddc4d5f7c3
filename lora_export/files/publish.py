"""Publishing what was built in a staging folder (``staging.staging_dir``): a main file with its companion
files as one unit (a model and its external data), a whole folder swapped in one step, or a folder's
files one by one where a swap is impossible (a mount point). A journal in the staging folder lets the
next run (``staging.clean_stale`` calls ``recover``) undo or finish what a killed run left half-done.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from .journal import JOURNAL, undo_added, unlink_regular, write_journal
from .staging import has_mounts, is_stage_entry


def publish_set(
    stage: Path,
    main: str,
    companions: Sequence[str],
    dest_dir: Path,
    *,
    obsolete: Iterable[str] = (),
) -> list[Path]:
    """Move ``main`` and its ``companions`` from ``stage`` into ``dest_dir`` as one unit: at every instant
    (kill -9 included) ``dest_dir`` holds the previous ``main`` with everything it reads, or the new one
    with everything it reads. Returns the published paths, companions first.

    Companion names must be unique per content (``graph.model_io`` puts a content hash in a data file's
    name): a companion name that is already there holds the same bytes, so it stays as it is, and no old
    ``main`` ever sees its companion change. The companions are hard-linked in first (renamed where links
    are impossible), then ``main`` is renamed over the old one: the one commit point. After it the
    ``obsolete`` names (the old main's companions the new one does not read) are removed. ``stage`` is a
    staging folder in ``dest_dir`` (same filesystem); until it is removed its journal tells the next run
    to remove the companions this run added (killed before the commit) or the obsolete ones (after).
    """
    obsolete = [o for o in obsolete if o not in companions and o != main]
    added = [c for c in companions if not os.path.lexists(dest_dir / c)]
    write_journal(stage, {"main": main, "added": added, "obsolete": obsolete})
    try:
        for c in companions:
            if c not in added:
                if not stat.S_ISREG(os.lstat(dest_dir / c).st_mode):
                    raise FileExistsError(errno.EEXIST, "in the way, and not a regular file", str(dest_dir / c))
                continue
            try:
                os.link(stage / c, dest_dir / c, follow_symlinks=False)
            except FileExistsError:
                raise
            except OSError:
                os.rename(stage / c, dest_dir / c)
        os.replace(stage / main, dest_dir / main)
    except BaseException:
        undo_added(stage, dest_dir, added)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stage / JOURNAL)
        raise
    for o in obsolete:
        unlink_regular(dest_dir / o)
    os.unlink(stage / JOURNAL)
    return [dest_dir / n for n in (*companions, main)]


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

    ``new`` and ``aside`` are inside a staging folder beside ``dest``, which the caller removes; ``aside``
    must be ``<stage>/old`` so that the next run can put a folder back that a kill left there.
    """
    if not os.path.lexists(dest):
        os.rename(new, dest)
        return
    if _renameat2_exchange(new, dest):
        return  # ``new`` now names the old folder
    # No exchange: for a moment there is no folder at ``dest``, never a mixed one.
    write_journal(aside.parent, {"swap": dest.name})
    os.rename(dest, aside)
    os.rename(new, dest)
    os.unlink(aside.parent / JOURNAL)


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (cheap, same filesystem); copy where links are not possible."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Bring the entries of folder ``old`` that are not in ``skip`` into folder ``new`` (links, not copies).

    The tool's own staging entries stay behind; a user's entry that merely looks like one comes along."""
    for entry in os.scandir(old):
        if entry.name in skip or is_stage_entry(old, entry.name):
            continue
        target = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            shutil.copytree(entry.path, target, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry.path, str(target))


def stage_parent(dest: Path) -> Path:
    """Where to stage a folder output: beside it (then swapped in whole), or inside it when it is, or holds,
    a mount point (a Docker volume, NFS) that a swap would fail on or copy off its filesystem."""
    return dest if dest.is_dir() and has_mounts(dest) else dest.parent


def publish_folder(
    new: Path,
    dest: Path,
    stage: Path,
    *,
    replaced: set[str],
    stale: set[str] = frozenset(),
    main: tuple[str, Sequence[str]] | None = None,
    last: str | None = None,
) -> None:
    """Make ``dest`` hold the files built in ``new`` (a folder inside ``stage``, from ``stage_parent``).

    Beside ``dest``: the entries of an old ``dest`` not in ``replaced`` or ``stale`` are linked in and the
    whole folder is swapped in (old folder or new, never a mix). Inside ``dest`` (a mount point): each
    file is renamed in on its own, ``main`` (name, companions) as one unit through ``publish_set``, ``last``
    after it; the ``stale`` files are removed after the commit. Entries of ``dest`` that are not
    ``replaced`` or ``stale`` are never touched.
    """
    if stage.parent != dest:
        if dest.is_dir():
            os.chmod(new, stat.S_IMODE(dest.stat().st_mode))
            carry_over(dest, new, skip=replaced | stale)
        swap_dir(new, dest, stage / "old")
        return
    names = sorted(p.name for p in new.iterdir())
    held = ({main[0], *main[1]} if main else set()) | {last}
    for name in names:
        if name not in held:
            os.replace(new / name, dest / name)
    if main is not None:
        for c in main[1]:
            os.replace(new / c, stage / c)
        os.replace(new / main[0], stage / main[0])
        publish_set(stage, main[0], list(main[1]), dest, obsolete=stale - set(names))
    if last is not None and last in names:
        os.replace(new / last, dest / last)
    for name in stale - set(names):
        unlink_regular(dest / name)  # files an earlier run wrote; never a folder

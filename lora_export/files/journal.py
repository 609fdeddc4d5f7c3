"""The journal a staging folder keeps while its run publishes (``publish.publish_set``, ``publish.swap_dir``),
and ``recover``: what the next run does with the journal of a run that was killed half-way."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

JOURNAL = "journal.json"


def write_journal(stage: Path, record: dict) -> None:
    """Record what ``stage``'s run is about to publish (all or nothing, also under kill -9)."""
    tmp = stage / f"{JOURNAL}.tmp"
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, stage / JOURNAL)  # all or nothing, also under kill -9


def _read_journal(stage: Path) -> dict:
    try:
        data = json.loads((stage / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _plain_names(values: object) -> list[str]:
    """The plain file names of a journal list (an edited journal cannot point anywhere else)."""
    if not isinstance(values, list):
        return []
    return [v for v in values if isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\0" not in v]


def unlink_regular(path: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)


def undo_added(stage: Path, dest_dir: Path, added: Sequence[str]) -> None:
    for c in added:
        with contextlib.suppress(OSError):
            here, there = os.lstat(stage / c), os.lstat(dest_dir / c)
            if os.path.samestat(here, there):  # our link, not a file someone put there since
                os.unlink(dest_dir / c)
                continue
        if not (stage / c).exists():  # renamed, not linked: the name was free when this run checked
            unlink_regular(dest_dir / c)


def recover(stage: Path) -> None:
    """Put right what the killed run that owned ``stage`` was publishing (see ``publish_set``, ``swap_dir``)."""
    record = _read_journal(stage)
    parent = stage.parent
    swapped = _plain_names([record.get("swap")])
    if swapped:
        # Killed between the two renames of a swap without exchange: the old folder is back, not lost.
        if not os.path.lexists(parent / swapped[0]) and (stage / "old").is_dir():
            os.rename(stage / "old", parent / swapped[0])
        return
    main = _plain_names([record.get("main")])
    if not main:
        return
    if os.path.lexists(stage / main[0]):  # not committed: the previous main is still there
        undo_added(stage, parent, _plain_names(record.get("added")))
    else:
        for o in _plain_names(record.get("obsolete")):
            unlink_regular(parent / o)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stage / JOURNAL)

"""A reader-writer lock: many readers at once, one writer alone, neither side starved.

A waiting writer stops new readers from entering; when it is done, the readers that waited for it go first
(all of them, before the next writer), so a tight loop of switches cannot starve runs, nor runs a switch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ReadWriteLock:
    """``reading()`` is shared, ``writing()`` exclusive."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._readers_turn = False  # set when a writer leaves with readers waiting: they go next

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writing or (self._writers_waiting and not self._readers_turn):
                    self._cond.wait()
            finally:
                self._readers_waiting -= 1
            self._readers += 1
            if not self._readers_waiting:
                self._readers_turn = False
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers or (self._readers_turn and self._readers_waiting):
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._readers_turn = self._readers_waiting > 0
                self._cond.notify_all()

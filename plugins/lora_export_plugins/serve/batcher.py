"""Mixed-adapter micro-batches inside one replica, as plain asyncio: no Ray here, so it is tested alone.

Requests whose inputs agree on everything but the batch dimension join one group. A group is due when it
holds ``max_rows`` rows or ``wait_s`` after its first request, and runs when it is due and the model is free:
one group runs at a time (more would only share the same cores), so while the model is busy the next
requests wait together and run as one group — what makes batches form under load. With a per-row model a
group mixes adapters (each row carries its own); otherwise a group holds one adapter. ``run_group`` receives
``[(adapter, feeds), ...]`` and returns one list of outputs per request; it runs in a worker thread, so the
event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Item = tuple[str | None, Mapping[str, np.ndarray]]
RunGroup = Callable[[Sequence[Item]], list[list[np.ndarray]]]


@dataclass(eq=False)
class _Group:
    key: tuple | None
    items: list[Item] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    rows: int = 0
    due: bool = False
    timer: asyncio.TimerHandle | None = None


def signature(feeds: Mapping[str, np.ndarray]) -> tuple:
    """What requests must share to be concatenated along the batch axis."""
    return tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(feeds.items()))


class Batcher:
    """Collects requests into groups and runs each group once, one group at a time."""

    def __init__(self, run_group: RunGroup, *, max_rows: int, wait_s: float, mixed: bool) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.run_group = run_group
        self.max_rows = max_rows
        self.wait_s = max(0.0, wait_s)
        self.mixed = mixed
        self._open: dict[tuple, _Group] = {}  # groups still taking rows, by signature
        self._queue: list[_Group] = []  # groups not started yet, oldest first
        self._running = False
        #: Rows per executed group, for the load test's figures.
        self.group_rows: list[int] = []

    async def submit(self, adapter: str | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Queue one request; returns its outputs once its group ran."""
        rows = next(iter(feeds.values())).shape[0]
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if rows >= self.max_rows:
            group = _Group(None, due=True)
            self._queue.append(group)
        else:
            key = signature(feeds) if self.mixed else (adapter, signature(feeds))
            group = self._open.get(key)
            if group is not None and group.rows + rows > self.max_rows:
                self._close(group)
                group = None
            if group is None:
                group = self._open[key] = _Group(key)
                self._queue.append(group)
                group.timer = loop.call_later(self.wait_s, self._due, group)
        group.items.append((adapter, feeds))
        group.futures.append(future)
        group.rows += rows
        if group.rows >= self.max_rows:
            self._close(group)
        self._pump(loop)
        return await future

    def _close(self, group: _Group) -> None:
        """No more rows for ``group``: it is due."""
        if group.key is not None and self._open.get(group.key) is group:
            del self._open[group.key]
        group.due = True

    def _due(self, group: _Group) -> None:
        group.due = True  # still open: rows arriving before the model is free join it
        self._pump(asyncio.get_running_loop())

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._running:
            return
        group = next((g for g in self._queue if g.due), None)
        if group is None:
            return
        self._queue.remove(group)
        self._close(group)
        if group.timer is not None:
            group.timer.cancel()
        self._running = True
        self.group_rows.append(group.rows)
        task = loop.run_in_executor(None, self.run_group, group.items)

        def done(t: asyncio.Future) -> None:
            self._running = False
            error = t.exception()
            for i, f in enumerate(group.futures):
                if f.done():
                    continue
                if error is not None:
                    f.set_exception(error)
                else:
                    f.set_result(t.result()[i])
            self._pump(loop)

        task.add_done_callback(done)


def concat(items: Sequence[Item]) -> tuple[dict[str, np.ndarray], list[str | None], list[int]]:
    """One feed dict for a group, each row's adapter, and each request's row count."""
    counts = [next(iter(f.values())).shape[0] for _, f in items]
    rows = [a for (a, _), n in zip(items, counts) for _ in range(n)]
    if len(items) == 1:
        return dict(items[0][1]), rows, counts
    names = list(items[0][1])
    return {k: np.concatenate([f[k] for _, f in items]) for k in names}, rows, counts


def split(outputs: Sequence[np.ndarray], counts: Sequence[int]) -> list[list[np.ndarray]]:
    """Each request's slice of a group's outputs (dimension 0 is the batch)."""
    bounds = np.cumsum([0, *counts])
    return [[np.asarray(o[bounds[i] : bounds[i + 1]]) for o in outputs] for i in range(len(counts))]

"""The resident adapter pool of a per-row model (``graph.per_row``): entries taken and freed at run time.

Each pool input is one array (capacity, ...) of the slot's tensors, entry 0 the reserved "no adapter" (zeros;
DoRA g: ones). ``load`` writes an adapter's tensors into a free entry, ``unload`` frees it; no session is
rebuilt. Capacity grows by doubling up to ``pool_size`` + 1 entries, and a slot's rank grows to the largest
rank loaded (zero-padded: exact); a run's cost depends on neither the number of entries nor which are taken.

Consistency: ``reading()`` holds a shared lock for a whole run, ``load``/``unload`` an exclusive one, so a run
never sees a half-written entry or an entry reused under it; runs do not block each other. The OrtValues
handed to a run are built from the arrays after each change (CPU: views of them; CUDA: one device copy per
change, resident between runs).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort

from ..errors import AdapterError
from ..graph.model.slot_manifest import Slot, SlotManifest
from ..graph.slots.per_row import NO_ADAPTER
from .feeds import listed


class _SharedLock:
    """Many readers or one writer; a waiting writer holds new readers back (loads are not starved)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class AdapterPool:
    """Pool entries by adapter name over a per-row model's slot inputs.

    ``pool_size``: how many adapters may be resident at once. ``evict``: None (a full pool refuses a load) or
    ``"lru"`` (the least recently run or loaded adapter makes room). ``to_value(array)``: an OrtValue on the
    session's device.
    """

    def __init__(self, manifest: SlotManifest, pool_size: int, evict: str | None, to_value) -> None:
        if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
            raise AdapterError(f"pool_size must be a positive integer, not {pool_size!r}")
        if evict not in (None, "lru"):
            raise AdapterError(f"evict must be None or 'lru', not {evict!r}")
        self.pool_size = pool_size
        self.evict = evict
        self._to_value = to_value
        self._slots: list[Slot] = list({s.a: s for _, s in sorted(manifest.slots.items())}.values())
        self._ranks = {s.a: 0 for s in self._slots}
        self._capacity = 1
        self._arrays: dict[str, np.ndarray] = {}
        for s in self._slots:
            self._arrays.update(self._empty(s, 1, 0))
        self._entries: OrderedDict[str, int] = OrderedDict()  # name → entry, least recently used first
        self._lock = _SharedLock()
        self._meta = threading.Lock()  # the LRU order, touched by concurrent runs
        self._values = {k: to_value(v) for k, v in self._arrays.items()}

    # -- contents ------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        with self._meta:
            return sorted(self._entries)

    def describe(self) -> dict:
        """Capacity, ranks and entries, for ``inspect``-like reports."""
        with self._lock.shared(), self._meta:
            return {
                "pool_size": self.pool_size,
                "evict": self.evict,
                "entries": dict(sorted(self._entries.items(), key=lambda kv: kv[1])),
                "ranks": dict(sorted(self._ranks.items())),
            }

    def load(self, name: str, tensors: Mapping[str, np.ndarray]) -> list[str]:
        """Put ``tensors`` (one adapter's slot tensors, checked) in a free entry; returns the names evicted."""
        evicted: list[str] = []
        with self._lock.exclusive():
            if name in self._entries:
                raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
            if len(self._entries) >= self.pool_size:
                if self.evict != "lru":
                    raise AdapterError(
                        f"the adapter pool is full ({self.pool_size} adapters: {listed(map(repr, self._entries))}); "
                        "unload one, or create the session with a larger pool_size or evict='lru'"
                    )
                with self._meta:
                    old, _ = self._entries.popitem(last=False)
                evicted.append(old)
            entry = self._free_entry()
            self._grow(entry, tensors)
            for s in self._slots:
                self._write(s, entry, tensors)
            with self._meta:
                self._entries[name] = entry
            self._values = {k: self._to_value(v) for k, v in self._arrays.items()}
        return evicted

    def unload(self, name: str) -> None:
        with self._lock.exclusive():
            with self._meta:
                entry = self._entries.pop(name, None)
            if entry is None:
                raise AdapterError(f"no adapter named {name!r} is loaded")
            for s in self._slots:  # a freed entry holds "no adapter" again
                self._write(s, entry, {})
            self._values = {k: self._to_value(v) for k, v in self._arrays.items()}

    @contextmanager
    def reading(self, rows: Sequence[str | None]):
        """For one run: (ids array, pool OrtValues by input name), consistent until the block ends."""
        with self._lock.shared():
            with self._meta:
                ids = []
                for row in rows:
                    if row is None:
                        ids.append(NO_ADAPTER)
                        continue
                    entry = self._entries.get(row) if isinstance(row, str) else None
                    if entry is None:
                        loaded = listed(map(repr, sorted(self._entries)))
                        raise AdapterError(f"no adapter named {row!r} is loaded (loaded: {loaded})")
                    self._entries.move_to_end(row)
                    ids.append(entry)
            yield np.array(ids, dtype=np.int64), self._values

    # -- storage -------------------------------------------------------------------------------

    def _empty(self, s: Slot, capacity: int, rank: int) -> dict[str, np.ndarray]:
        out = {
            s.a: np.zeros((capacity, *s.a_shape(rank)), s.np_dtype),
            s.b: np.zeros((capacity, *s.b_shape(rank)), s.np_dtype),
        }
        if s.dora:
            out[s.dora] = np.ones((capacity, s.out_features), s.np_dtype)
        return out

    def _free_entry(self) -> int:
        taken = set(self._entries.values())
        free = next((i for i in range(1, self._capacity) if i not in taken), None)
        if free is not None:
            return free
        free = self._capacity
        self._resize(min(max(2 * self._capacity, 2), self.pool_size + 1), None)
        return free

    def _grow(self, entry: int, tensors: Mapping[str, np.ndarray]) -> None:
        """Raise a slot's pool rank where ``tensors`` need more (zero-padded: exact for the other entries)."""
        needed = {s.a: int(tensors[s.a].shape[-1]) for s in self._slots if s.a in tensors}
        if any(r > self._ranks[a] for a, r in needed.items()):
            self._resize(self._capacity, {a: max(r, self._ranks[a]) for a, r in needed.items()})

    def _resize(self, capacity: int, ranks: dict[str, int] | None) -> None:
        for s in self._slots:
            rank = (ranks or {}).get(s.a, self._ranks[s.a])
            new = self._empty(s, capacity, rank)
            old_r, n = self._ranks[s.a], min(capacity, self._capacity)
            new[s.a][:n, :, :old_r] = self._arrays[s.a][:n]
            new[s.b][:n, :old_r, :] = self._arrays[s.b][:n]
            if s.dora:
                new[s.dora][:n] = self._arrays[s.dora][:n]
            self._arrays.update(new)
            self._ranks[s.a] = rank
        self._capacity = capacity

    def _write(self, s: Slot, entry: int, tensors: Mapping[str, np.ndarray]) -> None:
        a, b = self._arrays[s.a], self._arrays[s.b]
        a[entry] = 0
        b[entry] = 0
        if s.a in tensors:
            r = int(tensors[s.a].shape[-1])
            a[entry, :, :r] = tensors[s.a]
            b[entry, :r, :] = tensors[s.b]
        if s.dora:
            self._arrays[s.dora][entry] = tensors.get(s.dora, 1)


def checked_rows(adapters, batch: int | None, per_row: bool) -> list[str | None]:
    """``run(adapters=...)`` checked: one adapter name or None per batch row (one name only off a per-row model)."""
    if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
        raise AdapterError(f"adapters must be a list with one adapter name (or None) per batch row, not {adapters!r}")
    rows = list(adapters)
    if not rows or any(r is not None and not isinstance(r, str) for r in rows):
        raise AdapterError("adapters must be a non-empty list of adapter names or None, one per batch row")
    if batch is not None and len(rows) != batch:
        raise AdapterError(f"adapters names {len(rows)} rows, the batch has {batch}")
    if not per_row and len(set(rows)) > 1:
        raise AdapterError(
            "this model applies one adapter to the whole batch; inject with --per-row for an adapter per row"
        )
    return rows


def pool_value_factory(device_type: str, device_id: int):
    """An OrtValue on the session's device for a pool array (CPU: a view of it, no copy)."""

    def to_value(arr: np.ndarray) -> ort.OrtValue:
        if str(arr.dtype) == "bfloat16":
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(arr).view(np.uint16), 16)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), device_type, device_id)

    return to_value

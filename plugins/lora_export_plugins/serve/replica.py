"""One replica's model: a LoraSession, the adapters resident in it, and runs of mixed-adapter groups.

No Ray here. Which adapters stay resident is decided by two things: Serve's multiplexed LRU ``hold``s at most
K of them (that is what routes requests to this replica), and a running group pins the adapters of its rows,
so an adapter Serve evicts mid-run is unloaded when the run ends, never under it.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .batcher import Item, concat, split
from .catalog import Catalog
from .protocol import UnknownAdapter


def per_row(session) -> bool:
    """True when the session's model picks an adapter per row (``inject --per-row``)."""
    if not getattr(session, "per_row", False):
        return False
    return "adapters" in inspect.signature(session.run).parameters


def batchable(session) -> bool:
    """Requests can be concatenated when every input and output has a free dimension 0 (the batch)."""
    args = list(session.get_inputs()) + list(session.get_outputs())
    return all(a.shape and not isinstance(a.shape[0], int) for a in args)


class ReplicaModel:
    """A LoraSession over ``model_dir/model.onnx`` with adapters loaded on demand from ``catalog``."""

    def __init__(
        self, model_dir: Path, catalog: Catalog, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> None:
        """``threads``: ONNX Runtime's intra-op threads (default: its own, every core of the machine); they
        sleep rather than spin between parallel sections."""
        import onnxruntime as ort

        from lora_export import LoraSession

        options = ort.SessionOptions()
        options.log_severity_level = 3  # as LoraSession's default: its LoRA inputs' defaults are not news
        if threads is not None:
            options.intra_op_num_threads = threads
        # A replica shares its cores with Serve's proxy, Ray and other replicas: workers spinning between
        # parallel sections would take the CPU they need (measured: 2 threads, batch 8, on a busy 2-core
        # machine: 25 ms of CPU per row without spinning, 36 ms with it).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = LoraSession(Path(model_dir) / "model.onnx", providers=providers, sess_options=options)
        self.catalog = catalog
        self.per_row = per_row(self.session)
        self.batchable = batchable(self.session)
        self.inputs = {a.name: (a.type, list(a.shape)) for a in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}
        self._held: set[str] = set()

    # -- residency ----------------------------------------------------------------------------

    def hold(self, name: str) -> None:
        """Serve's LRU keeps ``name`` on this replica: load it now (the request that asked is waiting)."""
        with self._lock:
            self._load(name)
            self._held.add(name)

    def release(self, name: str) -> None:
        """Serve's LRU evicted ``name``: unload it unless a running group still uses it."""
        with self._lock:
            self._held.discard(name)
            self._drop_if_idle(name)

    def resident(self) -> list[str]:
        return self.session.adapters

    def _load(self, name: str) -> None:
        if name in self.session.adapters:
            return
        source = self.catalog.source(name)
        if source is None:
            raise UnknownAdapter(f"no adapter named {name!r} (GET /v1/adapters lists them)")
        self.session.load_adapter(name, source)

    def _drop_if_idle(self, name: str) -> None:
        if self._pins.get(name, 0) == 0 and name not in self._held and name in self.session.adapters:
            self.session.unload_adapter(name)

    # -- runs ---------------------------------------------------------------------------------

    def run_group(self, items: Sequence[Item]) -> list[list[np.ndarray]]:
        """Run one group (see ``Batcher``): rows concatenated, each with its own adapter."""
        feeds, rows, counts = concat(items)
        names = sorted({a for a in rows if a is not None})
        with self._lock:
            for n in names:  # pin first: a load failure leaves nothing pinned
                self._load(n)
            for n in names:
                self._pins[n] = self._pins.get(n, 0) + 1
        try:
            if len(set(rows)) <= 1:
                outputs = self.session.run(None, feeds, adapter=rows[0])
            else:
                outputs = self.session.run(None, feeds, adapters=rows)
        finally:
            with self._lock:
                for n in names:
                    self._pins[n] -= 1
                    self._drop_if_idle(n)
        return split(outputs, counts)

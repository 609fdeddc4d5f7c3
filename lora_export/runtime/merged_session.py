"""Serving a plain base model with merged weights, adapters switched in place: ``MergedSession``.

A run costs what a merged model costs: no LoRA branch, no extra input. A switch writes W₀ + ΔW into the
targeted weights only, computed the way ``lora-export merge`` computes it (``plan_merge``, ``merged_value``
and each op layout's ``write``), from the pristine W₀ that the base's own files hold (onnx-ir memory-maps
external data: no second resident copy of the base). Nothing is ever subtracted, so switching cannot drift.

Mechanism: the targeted initializers become graph inputs of the session's copy of the graph, fed at every run
(IOBinding) from buffers this object owns; a switch rewrites those buffers in place (``np.copyto`` on CPU,
``OrtValue.update_inplace`` on a device). Every other weight stays a constant initializer, so ONNX Runtime
still prepacks it; only the targeted MatMuls lose their prepacked weight, and on the CPU they read it
transposed (``session_proto``: MLAS packs a transposed B at half the cost). benchmarks/hot_swap.py has the
figures (switch vs a new session on merge's file, runs vs that session, per-kernel times). Outputs differ
from merge's file's session by ~1e-6 relative, as ONNX Runtime's own prepacked and unprepacked GEMMs differ
on the same weights. A reader-writer lock makes every run see one adapter's weights entirely: a switch waits
for runs in flight and runs wait for a switch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ..core.adapter import Adapter
from ..errors import AdapterError, LoraExportError, TargetError, one_line
from ..files.checks import require_regular_file
from ..formats.adapter_files import ADAPTER_SUFFIXES, read_adapter_tensors
from ..formats.peft import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from ..graph.model.model_io import external_tensors, load_model
from ..graph.ops.consumers import other_readers
from ..graph.targets.genai_names import read_genai_config
from ..graph.targets.resolve import ResolvedTarget
from ..graph.verbs.merge_plan import merged_value, plan_merge
from .fast_fold import Transposer, fold_into, ort_value, stored_orientation
from .feeds import checked_feeds, listed, requested_outputs
from .rwlock import ReadWriteLock
from .session_proto import session_model

Source = str | os.PathLike | Adapter


class MergedSession:
    """An ONNX Runtime session over a plain base model whose targeted weights are rewritten per adapter.

    ``adapters`` (name → source) are loaded before the session is created, so it is built once; adapters
    loaded later that target other weights rebuild it (once per such load). ``requantize``: quantized
    targets are requantized on every switch (lossy; ``switch`` reports the error per target) instead of
    refused. ``providers`` default to CUDA when it works, else CPU. Thread-safe. Given ``sess_options`` get
    the config entry that points ONNX Runtime at the base's external data folder added. ``transpose_feeds``
    (CPU): feed MatMul weights transposed: runs 2–3% faster, a switch pays a transpose per weight (cheap at
    768×768, 8–11 ms at 2048×2048; benchmarks/hot_swap.py); False for switch-heavy use of a large model.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        *,
        adapters: Mapping[str, Source] | None = None,
        sess_options: ort.SessionOptions | None = None,
        requantize: bool = False,
        compute_dtype: np.dtype | type = np.float32,
        transpose_feeds: bool = True,
    ) -> None:
        from .session import cuda_works

        self.model_path = require_regular_file(model_path, "model")
        # Lazily loaded: external tensors stay in the base's files (memory-mapped when read).
        self._model = load_model(self.model_path)
        self._genai = read_genai_config(self.model_path)
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_works() else ["CPUExecutionProvider"]
        self._providers = list(providers)
        if sess_options is None:
            sess_options = ort.SessionOptions()
            sess_options.log_severity_level = 3
        self._sess_options = sess_options
        self.requantize = bool(requantize)
        self.compute_dtype = np.dtype(compute_dtype)
        self._transpose_feeds = bool(transpose_feeds)
        self._external = any(True for _ in external_tensors(self._model))
        self._graph = self._model.graph
        # The pristine tensors of every weight a loaded adapter writes (the base's own, memory-mapped).
        self._pristine: dict[str, ir.TensorProtocol] = {}
        self._plans: dict[str, list[ResolvedTarget]] = {}
        self._writes: dict[str, set[str]] = {}  # adapter → initializers its switch writes
        self._orientation: dict[str, dict[str, bool]] = {}  # adapter → fast-path weights: stored transposed?
        self._buffers: dict[str, np.ndarray] = {}
        self._flipped: set[str] = set()  # buffers holding the stored weight's transpose (see session_proto)
        self._transposer: Transposer | None = None
        self._values: dict[str, ort.OrtValue] = {}
        self._scratch: dict[tuple[int, ...], np.ndarray] = {}
        self._dirty: set[str] = set()  # initializers that hold something other than W₀ now
        self._active: str | None = None
        self._rw = ReadWriteLock()
        self._admin = threading.RLock()  # one load/switch/unload at a time
        #: What the last switch did: timings (s) and, when requantizing, each target's error.
        self.last_switch: dict = {}
        self._fold_reports: dict[str, dict] = {}
        for name, source in (adapters or {}).items():
            self._plan(name, source)
        self._build(set(self._pristine))

    # -- introspection ---------------------------------------------------------------------------

    @property
    def active(self) -> str | None:
        """The adapter whose weights the session runs now (None: the base model)."""
        return self._active

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        with self._admin:
            return sorted(self._plans)

    @property
    def targeted_initializers(self) -> list[str]:
        """The initializers switches rewrite (fed from this object's buffers)."""
        return sorted(self._pristine)

    def weight(self, name: str) -> np.ndarray:
        """A copy of a targeted initializer as the session reads it now, in its stored layout and dtype."""
        with self._rw.reading():
            if name not in self._values:
                raise LoraExportError(f"{name!r} is not a targeted initializer ({listed(self.targeted_initializers)})")
            if name in self._buffers:
                buf = self._buffers[name]
                return np.ascontiguousarray(buf.T) if name in self._flipped else buf.copy()
            arr = self._values[name].numpy()
            return arr.view(ml_dtypes.bfloat16) if self._pristine[name].dtype == ir.DataType.BFLOAT16 else arr

    def get_inputs(self) -> list[ort.NodeArg]:
        """The model's inputs, as ``InferenceSession.get_inputs`` gives them for the base model."""
        return list(self._inputs.values())

    def get_outputs(self) -> list[ort.NodeArg]:
        return list(self._session.get_outputs())

    def get_providers(self) -> list[str]:
        return self._session.get_providers()

    def __repr__(self) -> str:
        return f"<MergedSession {str(self.model_path)!r} adapters={self.adapters} active={self._active!r}>"

    # -- adapters ------------------------------------------------------------------------------------

    def load_adapter(self, name: str, source: Source, *, scale: float = 1.0, allow_partial: bool = False) -> None:
        """Resolve an adapter's targets in the base (as ``merge`` does) and keep its plan under ``name``.

        ``source``: a PEFT adapter folder (or its config/weights file), a ``.onnx_adapter`` or ``.safetensors``
        file of slot tensors (as ``inject``/``convert`` write them), or an ``Adapter``. Every check ``merge``
        makes runs here, and the merged weights are computed once to prove they are finite; nothing changes
        in the running session unless the adapter targets weights no earlier adapter did (the session is then
        rebuilt with them as inputs, the active adapter kept).
        """
        with self._admin:
            before = set(self._pristine)
            self._plan(name, source, scale=scale, allow_partial=allow_partial)
            if set(self._pristine) != before:
                try:
                    self._build(set(self._pristine))
                except BaseException:
                    self._forget(name, before)
                    raise

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (the active one cannot be unloaded: switch away first)."""
        with self._admin:
            if name not in self._plans:
                raise AdapterError(f"no adapter named {name!r} is loaded")
            if name == self._active:
                raise AdapterError(f"adapter {name!r} is active: switch to another (or None) first")
            del self._plans[name], self._writes[name]
            self._orientation.pop(name, None)

    def _forget(self, name: str, keep: set[str]) -> None:
        self._plans.pop(name, None)
        self._writes.pop(name, None)
        self._orientation.pop(name, None)
        for n in set(self._pristine) - keep:
            del self._pristine[n]

    def _plan(self, name: str, source: Source, *, scale: float = 1.0, allow_partial: bool = False) -> None:
        if not name or not isinstance(name, str):
            raise AdapterError("an adapter needs a non-empty name")
        if name in self._plans:
            raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
        adapter = self._adapter_of(source, name)
        if adapter.extra:
            raise AdapterError(
                f"adapter {name!r} replaces full tensors ({listed(sorted(adapter.extra))}); MergedSession serves LoRA "
                "deltas only: merge it with lora-export merge"
            )
        adapter, resolution = plan_merge(
            self._model,
            adapter,
            scale=scale,
            allow_partial=allow_partial,
            lossy_ok=self.requantize,
            genai_dims=self._genai,
        )
        for r in resolution.matched:
            shared = other_readers(r.value, r.nodes)
            if shared:
                raise TargetError(
                    f"{r.target.name}: its weight {r.value.name!r} is also read by {', '.join(shared[:3])}; a switch "
                    "would change them too: use lora-export merge (it gives the target a private copy) or inject"
                )
        plan = resolution.matched
        written = self._fold(plan)  # proves the weights finite; the arrays are dropped
        for n in written:
            if n not in self._graph.initializers:
                raise TargetError(f"adapter {name!r}: weight {n!r} is in a subgraph; MergedSession cannot feed it")
        self._plans[name] = plan
        self._writes[name] = set(written)
        self._orientation[name] = {r.value.name: o for r in plan if (o := stored_orientation(r)) is not None}
        for n in written:
            self._pristine.setdefault(n, self._graph.initializers[n].const_value)

    def _adapter_of(self, source: Source, name: str) -> Adapter:
        if isinstance(source, Adapter):
            return source
        path = Path(source)
        if (
            path.is_dir()
            or path.name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)
            or path.suffix not in ADAPTER_SUFFIXES
        ):
            from ..formats.peft import load_adapter

            return load_adapter(path, name)
        from ..formats.slot_adapter import adapter_from_slot_tensors
        from ..graph.targets.resolve import resolve_targets

        tensors = read_adapter_tensors(path)
        adapter = adapter_from_slot_tensors(tensors, name)
        # Slot files name modules, not ops: an embedding's 2-D slots look like a linear's; a 2-D target
        # found nowhere as a linear is tried as an embedding.
        missing = [r.target.name for r in resolve_targets(self._model, adapter).targets if r.status != "matched"]
        kinds = {m: "embedding" for m in missing if adapter.targets[m].A.ndim == 2}
        return adapter_from_slot_tensors(tensors, name, kinds) if kinds else adapter

    # -- the weights ---------------------------------------------------------------------------------

    def _fold(self, plan: list[ResolvedTarget]) -> dict[str, np.ndarray]:
        """The stored arrays ``merge`` would write for ``plan`` (W₀ + ΔW, rounded once), by initializer name.

        The layouts write into the in-memory graph, as in a merge; the pristine tensors are put back after.
        """
        inits = self._graph.initializers
        before = {n: v.const_value for n, v in inits.items()}
        reports = {}
        try:
            for r in plan:
                merged = merged_value(r, self.compute_dtype)
                r.layout.write(r.node, merged)
                stored = r.value.const_value
                if stored.dtype.is_floating_point() and not np.isfinite(stored.numpy().astype(np.float32)).all():
                    raise AdapterError(f"{r.target.name}: the merged weight overflows {stored.dtype.name}")
                report = getattr(r.layout, "last_write_report", None)
                if report:
                    reports[r.target.name] = dict(report)
                    r.layout.last_write_report = None
            if set(inits) != set(before):
                raise TargetError("a target's layout adds initializers when written; MergedSession cannot serve it")
            out = {n: v.const_value.numpy() for n, v in inits.items() if v.const_value is not before[n]}
        finally:
            for n, tensor in before.items():
                if n in inits and inits[n].const_value is not tensor:
                    inits[n].const_value = tensor
        self._fold_reports = reports
        return out

    def _pristine_array(self, name: str) -> np.ndarray:
        return self._pristine[name].numpy()  # a view of the memory-mapped file for external data

    def _build(self, owned: set[str]) -> None:
        """(Re)create the ONNX Runtime session with ``owned`` initializers fed from buffers; keep the active
        adapter's weights."""
        first = self._providers[0] if self._providers else "CPUExecutionProvider"
        on_cpu = (first[0] if isinstance(first, tuple) else first) == "CPUExecutionProvider"
        transpose = on_cpu and self._transpose_feeds
        model, flipped = session_model(
            self.model_path, owned, self._sess_options, external=self._external, transpose=transpose
        )
        try:
            session = ort.InferenceSession(model, self._sess_options, providers=self._providers)
        except Exception as e:  # noqa: BLE001
            raise LoraExportError(f"{self.model_path}: cannot create a session ({one_line(e)})") from None
        on_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
        buffers, values = dict(self._buffers), dict(self._values)
        if flipped and self._transposer is None:
            self._transposer = Transposer()
        for n in sorted(owned - set(values)):
            if n in flipped:  # the same decision for a name at every rebuild: the graph is the same
                w0 = self._pristine_array(n)
                buffers[n] = np.empty(w0.shape[::-1], w0.dtype)
                values[n] = ort_value(buffers[n], "cpu")
                self._transposer(w0, values[n])
                continue
            buf = np.array(self._pristine_array(n), order="C", copy=True)
            if on_cuda:
                values[n] = ort_value(buf, "cuda")
            else:
                buffers[n], values[n] = buf, ort_value(buf, "cpu")
        owned_inputs = set(values)
        inputs = {i.name: i for i in session.get_inputs() if i.name not in owned_inputs}
        with self._rw.writing():
            self._session, self._buffers, self._values, self._inputs = session, buffers, values, inputs
            self._flipped |= flipped
            self._outputs = [o.name for o in session.get_outputs()]

    def switch(self, name: str | None) -> dict:
        """Make ``name``'s merged weights the ones every later run reads (None: the base model's).

        Computed from the pristine W₀ each time, rounded once; only initializers that change are written.
        Runs in flight finish on the previous weights first; runs started after see the new ones. Returns
        (and keeps in ``last_switch``) the timings in seconds and, with ``requantize``, each target's error.
        """
        with self._admin:
            if name is not None and name not in self._plans:
                raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {listed(map(repr, self.adapters))})")
            t0 = time.perf_counter()
            plan = self._plans[name] if name is not None else []
            # Plain float32 MatMul/Gemm weights are folded straight into the live buffers (under the lock);
            # everything else through merge's own code into new arrays first, then copied.
            orient = self._orientation.get(name, {})
            fast = [(r, orient[r.value.name]) for r in plan if r.value.name in orient and r.value.name in self._buffers]
            fast_names = {r.value.name for r, _ in fast}
            new = self._fold([r for r in plan if r.value.name not in fast_names])
            t1 = time.perf_counter()
            restore = self._dirty - set(new) - fast_names
            with self._rw.writing():
                t2 = time.perf_counter()
                for n in restore:
                    self._write(n, self._pristine_array(n))
                for n, arr in new.items():
                    self._write(n, arr)
                for r, transposed in fast:
                    n = r.value.name
                    w0 = self._pristine_array(n)
                    scratch = self._scratch.get(w0.shape)
                    if scratch is None:
                        scratch = self._scratch[w0.shape] = np.empty(w0.shape, np.float32)
                    if n in self._flipped:  # folded in the stored orientation, as merge folds, then transposed
                        fold_into(r, transposed, w0, scratch, scratch)
                        self._transposer(scratch, self._values[n])
                    else:
                        fold_into(r, transposed, w0, self._buffers[n], scratch)
                self._active = name
            t3 = time.perf_counter()
            self._dirty = set(new) | fast_names
            self.last_switch = {
                "adapter": name,
                "written": sorted(restore | set(new) | fast_names),
                "timings": {"compute": t1 - t0, "wait": t2 - t1, "write": t3 - t2, "total": t3 - t0},
                **({"requantized": self._fold_reports} if self._fold_reports else {}),
            }
            return self.last_switch

    def _write(self, name: str, arr: np.ndarray) -> None:
        buf = self._buffers.get(name)
        if name in self._flipped:
            self._transposer(arr, self._values[name])
        elif buf is not None:
            np.copyto(buf, arr, casting="no")
        else:
            value = np.ascontiguousarray(arr)
            self._values[name].update_inplace(value.view(np.uint16) if value.dtype == ml_dtypes.bfloat16 else value)

    # -- inference -----------------------------------------------------------------------------------

    def run(
        self,
        output_names: Sequence[str] | None,
        feeds: Mapping[str, np.ndarray | ort.OrtValue],
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray]:
        """``InferenceSession.run`` on the active adapter's weights (inputs as the base model takes them)."""
        with self._rw.reading():
            names = requested_outputs(output_names, self._outputs)
            bound = checked_feeds(feeds, self._inputs, set(self._values))
            binding = self._session.io_binding()
            for k, v in bound.items():
                if isinstance(v, ort.OrtValue):
                    binding.bind_ortvalue_input(k, v)
                else:
                    binding.bind_cpu_input(k, v)
            for k, v in self._values.items():
                binding.bind_ortvalue_input(k, v)
            unique = list(dict.fromkeys(names))
            for n in unique:
                binding.bind_output(n)
            try:
                self._session.run_with_iobinding(binding, run_options)
            except Exception as e:  # noqa: BLE001
                raise LoraExportError(f"inference failed: {one_line(e)}") from None
            results = binding.copy_outputs_to_cpu()
        by_name = dict(zip(unique, results))
        return [by_name[n] if i == names.index(n) else by_name[n].copy() for i, n in enumerate(names)]

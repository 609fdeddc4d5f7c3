"""Serving an injected model: one ONNX Runtime session, many adapters, switched per call.

Adapters are validated once and placed on the session's device once, as OrtValues; each ``run`` binds
them with IOBinding, so switching adapters costs no copy and no session rebuild. ``adapter=None``
binds nothing for the LoRA inputs: their rank-0 defaults give the base model.

Cost of the rank-0 branches: none measurable. benchmarks/noadapter_probe.py (220M LLaMA, r=16 q/v, 2-core
CPU, seq 128, batch 1, 40 interleaved rounds): injected-with-no-adapter / base = 0.986 (quartiles 0.969 to
1.014); the +2.5% once reported by benchmarks/adapters.py at batch 1 was run-to-run noise.

A per-row model (``inject --per-row``) serves a different adapter per batch row: ``run(..., adapters=[...])``
binds the resident pool (``runtime.pool``) and the ids picking each row's entry.

``base_session=True`` adds a branch-free twin session (``base_path.strip_branches``) that serves
``adapter=None``. Its large initializers come from the same host memory as the main session's
(``SessionOptions.add_initializer`` / ``add_external_initializers`` over one set of numpy arrays), but on
CPU ONNX Runtime prepacks constant MatMul weights per session and its Python API cannot share prepacked
weights (no PrepackedWeightsContainer), so measured on the 220M model (RSS growth; weights 838 MiB):
main session alone 1161 MiB; with the twin 2341 MiB (raw weights kept for sharing + two packed copies);
twin without prepacking ~1650 MiB but 17% slower. The twin is no faster than the rank-0 branches
(1.002 × base) there, so it is off by default; on a packed int4 decode step (genai builder) rank-0 branches
cost +1.9 % by kernel time and the twin none (benchmarks/packed_branch.py): turn it on where that matters
more than one more copy of the weights. On CUDA
it is untested, and the shared arrays stay in host memory (each session copies them to the device).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnxruntime as ort

from ..core.adapter import Adapter
from ..errors import AdapterError, DtypeError, LoraExportError, one_line
from ..files.checks import require_regular_file
from ..formats.adapter_files import read_adapter_file
from ..formats.peft import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME
from ..graph.model.slot_manifest import SLOTS_KEY, Slot, SlotManifest
from ..graph.slots.per_row import per_row_meta
from ..graph.slots.tensors import adapter_tensors, check_finite_tensors, check_tensors
from ..graph.verbs.history_guard import (
    history_or_refusal,
    merged_repeat,
    refuse,
    safe_history,
    slot_digests,
    slots_repeat,
)
from .feeds import ORT_TYPES, batch_size, checked_feeds, listed, requested_outputs, run_bound
from .pool import AdapterPool, checked_rows, pool_value_factory
from .providers import cuda_works  # noqa: F401 - re-exported: where callers have always found it


class LoraSession:
    """An ONNX Runtime session over an injected model, with named adapters switched per call.

    ``providers`` defaults to CUDA when it actually works, else CPU. Thread-safe: concurrent ``run``
    calls each get their own IOBinding; the adapter registry is guarded by a lock.

    ``base_session=True``: ``adapter=None`` runs a branch-free twin session whose initializers share the
    main session's host memory (see the module docstring for the memory it still costs; off by default).
    A per-row model (``inject --per-row``) keeps its adapters in one resident pool of up to ``pool_size``
    entries (``runtime.pool``); ``run(..., adapters=[name or None per row])`` mixes them in one batch. A full
    pool refuses a load, or with ``evict="lru"`` frees the least recently used adapter.
    ``base_prepacking=False`` disables ONNX Runtime's weight prepacking in the twin (less memory, slower).
    With ``base_session=True`` the given ``sess_options`` get the shared initializers (and, with
    ``base_prepacking=False``, the disable-prepacking entry) added: do not reuse them for other models.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        sess_options: ort.SessionOptions | None = None,
        base_session: bool = False,
        base_prepacking: bool = True,
        pool_size: int = 64,
        evict: str | None = None,
    ) -> None:
        self.model_path = require_regular_file(model_path, "model")
        if sess_options is None:
            sess_options = ort.SessionOptions()
            # LoRA inputs carry default initializers by design; ORT's warning about that is noise.
            sess_options.log_severity_level = 3
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_works() else ["CPUExecutionProvider"]
        providers = list(providers)
        from ..graph.model.model_io import load_model

        # Checked like every model we read, before ONNX Runtime opens anything: external data by ONNX
        # Runtime's own rule (versions before about 1.23, which pyproject allows, do not apply it), slot
        # metadata, structure.
        model = load_model(self.model_path)
        # What was merged into the weights: an adapter loaded on top must not be one of those.
        self._history = safe_history(model)
        self._shared: dict[str, ort.OrtValue] = {}
        base_model = None
        if base_session:
            base_model, self._shared = self._prepare_base(model, sess_options)
        del model
        self.session = self._create(self.model_path, sess_options, providers)
        self.providers = self.session.get_providers()
        on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.device_type, self.device_id = ("cuda", 0) if on_cuda else ("cpu", 0)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.manifest = SlotManifest.from_json(meta.get(SLOTS_KEY))
        per_row = per_row_meta(meta)
        #: The resident adapter pool of a per-row model (None: one adapter per run).
        self.pool: AdapterPool | None = None
        if per_row is not None:
            if base_session:
                raise AdapterError(
                    "base_session=True does not apply to a per-row model (rows without adapter are exact)"
                )
            self.pool = AdapterPool(
                self.manifest, pool_size, evict, pool_value_factory(self.device_type, self.device_id)
            )
        #: The branch-free twin that serves ``adapter=None`` (None: the rank-0 branches serve it).
        self.base_session: ort.InferenceSession | None = None
        if base_model is not None:
            from .base_path import twin_proto

            if not base_prepacking:
                sess_options.add_session_config_entry("session.disable_prepacking", "1")
            # The twin's copies are placeholders, filled in place from the same OrtValues.
            sess_options.add_external_initializers(list(self._shared), list(self._shared.values()))
            self.base_session = self._create(twin_proto(base_model, self._shared), sess_options, providers)
            del base_model
        self._slot_inputs = {n for slot in self.manifest.slots.values() for n in slot.inputs}
        if per_row is not None:
            self._slot_inputs.add(per_row["ids"])
            self._ids_input = per_row["ids"]
        # ONNX Runtime lists inputs with a default (the LoRA slots) as overridable initializers, not as inputs;
        # filter both lists anyway, so an older IR that lists them as inputs gives the same split.
        graph_inputs = self.session.get_inputs() + self.session.get_overridable_initializers()
        self._inputs = {i.name: i for i in self.session.get_inputs() if i.name not in self._slot_inputs}
        self._slot_args = {i.name: i for i in graph_inputs if i.name in self._slot_inputs}
        self._output_args = self.session.get_outputs()
        self._outputs = [o.name for o in self._output_args]
        self._adapters: dict[str, dict[str, ort.OrtValue]] = {}
        self._lock = threading.Lock()
        self._base_entries: dict = {}  # module → its base weight's fingerprint entry, read once (base_check)

    def _create(self, model, sess_options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                model if isinstance(model, bytes) else str(model), sess_options, providers=providers
            )
        except Exception as e:  # noqa: BLE001
            raise LoraExportError(f"{self.model_path}: cannot create a session ({one_line(e)})") from None

    def _prepare_base(self, model, sess_options: ort.SessionOptions):
        """The stripped base model (``model``, as loaded) and its large initializers as OrtValues, added to
        ``sess_options``.

        Both sessions are created from ``sess_options``, so both take those initializers from the same
        OrtValues instead of loading their own copies.
        """
        from .base_path import shared_initializers, strip_branches

        strip_branches(model, SlotManifest.from_json(model.metadata_props.get(SLOTS_KEY)))
        # CPU memory on every provider: add_external_initializers reads host memory (device OrtValues are
        # not verified there), so on CUDA each session still copies the weights to the device.
        shared = shared_initializers(model)
        for name, value in shared.items():
            sess_options.add_initializer(name, value)
        return model, shared

    # -- adapters ------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        if self.pool is not None:
            return self.pool.names
        with self._lock:
            return sorted(self._adapters)

    @property
    def per_row(self) -> bool:
        """Whether the model picks an adapter per batch row (``inject --per-row``; ``run(adapters=...)``)."""
        return self.pool is not None

    @property
    def slots(self) -> dict[str, Slot]:
        """The injected modules' LoRA slots by module path (their inputs: ``get_slot_inputs()``)."""
        return self.manifest.slots

    # -- InferenceSession-like introspection ------------------------------------------------------

    def get_inputs(self) -> list[ort.NodeArg]:
        """The model's user inputs, as ``InferenceSession.get_inputs`` gives them (no LoRA slot inputs)."""
        return list(self._inputs.values())

    def get_outputs(self) -> list[ort.NodeArg]:
        """The model's outputs, as ``InferenceSession.get_outputs`` gives them."""
        return list(self._output_args)

    def get_slot_inputs(self) -> list[ort.NodeArg]:
        """The LoRA slot inputs (``<module>.lora_A`` / ``.lora_B`` / ``.dora_scale``); adapters fill them."""
        return [self._slot_args[n] for n in sorted(self._slot_args)]

    def get_providers(self) -> list[str]:
        """The execution providers the session actually got, in priority order."""
        return list(self.providers)

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return self.session.get_provider_options()

    def get_modelmeta(self) -> ort.ModelMetadata:
        """The model's metadata (producer, graph name, ``custom_metadata_map`` with the slot manifest)."""
        return self.session.get_modelmeta()

    def __repr__(self) -> str:
        twin = ", base_session" if self.base_session is not None else ""
        return (
            f"<LoraSession {str(self.model_path)!r} providers={self.providers} "
            f"slots={len(self.slots)} adapters={self.adapters}{twin}>"
        )

    def load_adapter(
        self,
        name: str,
        source: str | os.PathLike | Adapter | Mapping[str, np.ndarray],
        *,
        force: bool = False,
    ) -> None:
        """Validate and place an adapter on the device under ``name``.

        ``source``: a ``.onnx_adapter`` or ``.safetensors`` file of slot tensors, a PEFT adapter directory
        or ``Adapter`` (converted in memory), or a dict of slot tensors.

        An adapter the model's history records as merged into its weights (by its digest, a target's
        tensors, or its slot tensors) is refused: it would apply twice. So is any adapter when the history
        is unreadable or duplicated. An adapter carrying a base fingerprint (files lora-export wrote) that
        does not match the weights behind the model's slots is refused too. ``force=True`` loads it anyway.
        """
        if not name or not isinstance(name, str):
            raise AdapterError("an adapter needs a non-empty name")
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
        hint = "pass force=True to load it anyway"
        history = history_or_refusal(self._history, force, hint)
        tensors, what, adapter, fingerprint = self._tensors_of(source)
        if adapter is not None:
            refuse(merged_repeat(history, adapter), force, hint)
        refuse(slots_repeat(history, slot_digests(tensors, self.manifest), what), force, hint)
        self._check_base(what, tensors, fingerprint, history, force, hint)
        check_tensors(tensors, self.manifest, what)
        self._check_dtypes(tensors, what)
        # Files and dicts come from anywhere: NaN/Inf in a slot would turn every output NaN, silently.
        check_finite_tensors(tensors, what)
        if self.pool is not None:
            self.pool.load(name, tensors)
            return
        values = {k: self._ort_value(v) for k, v in sorted(tensors.items())}
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
            self._adapters[name] = values

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; runs already in flight keep their references and finish normally (per-row
        model: the pool entry is freed once the runs in flight are done)."""
        if self.pool is not None:
            self.pool.unload(name)
            return
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise AdapterError(f"no adapter named {name!r} is loaded")

    def _check_base(self, what: str, tensors, fingerprint, history: list[dict], force: bool, hint: str) -> None:
        """The base fingerprint the adapter carries (entries or an .onnx_adapter's code) against the weights
        behind the model's slots (``graph.base_check``)."""
        if fingerprint is None:
            return
        from ..graph.verbs.base_check import code_mismatch, mismatch, refuse_mismatch, slot_weights

        weights = slot_weights(self.manifest, self._read_weight(), history, self._base_entries)
        if isinstance(fingerprint, int):
            filled = [m for m, s in self.manifest.slots.items() if any(n in tensors for n in s.inputs)]
            found = code_mismatch(fingerprint, filled, weights)
        else:
            found = mismatch(fingerprint, weights)
        refuse_mismatch(found, what, "this model's", force, hint)

    def _tensors_of(self, source) -> tuple[dict[str, np.ndarray], str, Adapter | None, dict | int | None]:
        """The slot tensors of ``source``, what to call it, the Adapter it came from (if any) and the base
        fingerprint it carries (if any)."""
        if isinstance(source, Mapping):
            return {k: np.asarray(v) for k, v in source.items()}, "adapter tensors", None, None
        if isinstance(source, Adapter):
            tensors = adapter_tensors(source, self.manifest, self._read_weight())
            return tensors, f"adapter {source.name!r}", source, source.base_fingerprint
        path = Path(source)
        # A PEFT adapter: its folder, or one of its files (slot files have other names).
        if path.is_dir() or path.name in (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME):
            from ..formats.peft import load_adapter

            adapter = load_adapter(path)
            tensors = adapter_tensors(adapter, self.manifest, self._read_weight())
            return tensors, f"adapter {adapter.name!r}", adapter, adapter.base_fingerprint
        tensors, fingerprint = read_adapter_file(path)
        return tensors, str(path), None, fingerprint

    def _read_weight(self) -> Callable[[Slot], np.ndarray]:
        # A fresh reader per call: it holds the loaded model, which the session should not keep (an inline
        # model's weights would stay in memory beside ONNX Runtime's). What the fingerprint check needs of
        # the weights is cached in ``_base_entries`` instead.
        from ..graph.verbs.convert import weight_reader

        return weight_reader(self.model_path)

    def _check_dtypes(self, tensors: Mapping[str, np.ndarray], what: str) -> None:
        # check_tensors compared them with the manifest; the session's own input types are the final word.
        for k, v in tensors.items():
            if k not in self._slot_args:
                raise AdapterError(f"{what}: the model has no input {k!r} (its slot metadata does not match its graph)")
            want = ORT_TYPES.get(self._slot_args[k].type)
            if want is None or v.dtype != want:
                raise DtypeError(f"{what}: {k} has dtype {v.dtype}, the model expects {self._slot_args[k].type}")

    def _ort_value(self, arr: np.ndarray) -> ort.OrtValue:
        arr = np.ascontiguousarray(arr)
        if arr.dtype == ml_dtypes.bfloat16:
            # ortvalue_from_numpy refuses numpy's opaque bfloat16; hand ORT the bits with the ONNX type. CPU
            # memory: ORT copies it to the session's device when bound.
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), 16)
        return ort.OrtValue.ortvalue_from_numpy(arr, self.device_type, self.device_id)

    # -- inference -----------------------------------------------------------------------------

    def run(
        self,
        output_names: Sequence[str] | None,
        feeds: Mapping[str, np.ndarray | ort.OrtValue],
        adapter: str | None = None,
        run_options: ort.RunOptions | None = None,
        *,
        adapters: Sequence[str | None] | None = None,
    ) -> list[np.ndarray]:
        """``InferenceSession.run`` with the named adapter active (None: the base model).

        ``output_names``: a list of output names, or None (or empty) for all, as in ONNX Runtime.
        ``feeds``: every user input (``get_inputs()``) as a numpy array (or array-like, or OrtValue) of the
        model's dtype: nothing is cast. Returns numpy arrays, one per requested output, in the order asked.
        ``adapters``: per batch row, an adapter name or None (no adapter), in place of ``adapter``; a per-row
        model (``inject --per-row``) runs them in one batch; another model takes only one name for all rows.
        """
        names = requested_outputs(output_names, self._outputs)
        bound = checked_feeds(feeds, self._inputs, self._slot_inputs)
        if adapters is not None:
            if adapter is not None:
                raise AdapterError("give adapter= (one for all rows) or adapters= (one per row), not both")
            rows = checked_rows(adapters, batch_size(bound, self._inputs), self.pool is not None)
            if self.pool is None or len(set(rows)) == 1:
                # One adapter for all rows: ids of shape (1,) broadcast (one MatMul, no per-row copies);
                # all None: the defaults, no pool bound at all.
                adapter = rows[0]
            else:
                with self.pool.reading(rows) as (ids, values):
                    return self._bound_run(self.session, names, bound, {self._ids_input: ids, **values}, run_options)
        if self.pool is not None:
            if adapter is None:
                return self._bound_run(self.session, names, bound, {}, run_options)
            # One entry for every row: ids of shape (1,) broadcast over the batch.
            with self.pool.reading([adapter]) as (ids, values):
                return self._bound_run(self.session, names, bound, {self._ids_input: ids, **values}, run_options)
        values: dict[str, ort.OrtValue] = {}
        if adapter is not None:
            with self._lock:
                found = self._adapters.get(adapter) if isinstance(adapter, str) else None
            if found is None:
                loaded = listed(map(repr, self.adapters))
                raise AdapterError(f"no adapter named {adapter!r} is loaded (loaded: {loaded})")
            values = found
        session = self.session
        if adapter is None and self.base_session is not None:
            session = self.base_session
        return self._bound_run(session, names, bound, values, run_options)

    def _bound_run(self, session, names, bound, values, run_options) -> list[np.ndarray]:
        return run_bound(session, names, bound, values, run_options, on_cpu=self.device_type == "cpu")

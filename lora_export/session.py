"""Serving an injected model: one ONNX Runtime session, many adapters, switched per call.

Adapters are validated once and placed on the session's device once, as OrtValues; each ``run`` binds
them with IOBinding, so switching adapters costs no copy and no session rebuild. ``adapter=None``
binds nothing for the LoRA inputs: their rank-0 defaults give the base model.

Cost of the rank-0 branches: none measurable. benchmarks/noadapter_probe.py (220M LLaMA, r=16 q/v, 2-core
CPU, seq 128, batch 1, 40 interleaved rounds): injected-with-no-adapter / base = 0.986 (quartiles 0.969 to
1.014); the +2.5% once reported by benchmarks/adapters.py at batch 1 was run-to-run noise.

``base_session=True`` adds a branch-free twin session (``base_path.strip_branches``) that serves
``adapter=None``. Its large initializers come from the same host memory as the main session's
(``SessionOptions.add_initializer`` / ``add_external_initializers`` over one set of numpy arrays), but on
CPU ONNX Runtime prepacks constant MatMul weights per session and its Python API cannot share prepacked
weights (no PrepackedWeightsContainer), so measured on the 220M model (RSS growth; weights 838 MiB):
main session alone 1161 MiB; with the twin 2341 MiB (raw weights kept for sharing + two packed copies);
twin without prepacking ~1650 MiB but 17% slower. The twin is no faster than the rank-0 branches
(1.002 × base), so it is off by default: it buys nothing on CPU for one more copy of the weights. On CUDA
it is untested, and the shared arrays stay in host memory (each session copies them to the device).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnxruntime as ort

from .adapter import Adapter
from .adapter_files import read_adapter_tensors
from .errors import AdapterError, LoraExportError
from .file_checks import require_regular_file
from .slots import SLOTS_KEY, Slot, SlotManifest, adapter_tensors, check_finite_tensors, check_tensors

_ORT_TYPES = {
    "tensor(bfloat16)": np.dtype(ml_dtypes.bfloat16),
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
}


@functools.cache
def cuda_works() -> bool:
    """True when a session actually runs on the CUDA EP (listed is not enough: its libraries may be missing)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    # A failed CUDA library load is logged by ORT's process-wide logger, whatever the session's level;
    # silence it for the probe: falling back to the CPU is the expected outcome on machines without a GPU.
    ort.set_default_logger_severity(4)
    try:
        return _probe_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])[:1] == ["CUDAExecutionProvider"]
    except Exception:  # noqa: BLE001 - any failure means CUDA is unusable here
        return False
    finally:
        ort.set_default_logger_severity(2)  # ORT's default: warnings and above


def _probe_providers(providers: list[str]) -> list[str]:
    """The providers a one-node session actually gets."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=providers).get_providers()


class LoraSession:
    """An ONNX Runtime session over an injected model, with named adapters switched per call.

    ``providers`` defaults to CUDA when it actually works, else CPU. Thread-safe: concurrent ``run``
    calls each get their own IOBinding; the adapter registry is guarded by a lock.

    ``base_session=True``: ``adapter=None`` runs a branch-free twin session whose initializers share the
    main session's host memory (see the module docstring for the memory it still costs; off by default).
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
    ) -> None:
        self.model_path = require_regular_file(model_path, "model")
        if sess_options is None:
            sess_options = ort.SessionOptions()
            # LoRA inputs carry default initializers by design; ORT's warning about that is noise.
            sess_options.log_severity_level = 3
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_works() else ["CPUExecutionProvider"]
        providers = list(providers)
        self._shared: dict[str, ort.OrtValue] = {}
        base_model = None
        if base_session:
            base_model, self._shared = self._prepare_base(sess_options)
        self.session = self._create(self.model_path, sess_options, providers)
        self.providers = self.session.get_providers()
        on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.device_type, self.device_id = ("cuda", 0) if on_cuda else ("cpu", 0)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.manifest = SlotManifest.from_json(meta.get(SLOTS_KEY))
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
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        # The LoRA inputs have default initializers: ORT lists them as overridable initializers, not inputs.
        self._types = {i.name: i.type for i in (*self.session.get_overridable_initializers(), *self._inputs.values())}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._slot_inputs = {n for slot in self.manifest.slots.values() for n in slot.inputs}
        self._adapters: dict[str, dict[str, ort.OrtValue]] = {}
        self._lock = threading.Lock()

    def _create(self, model, sess_options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                model if isinstance(model, bytes) else str(model), sess_options, providers=providers
            )
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise LoraExportError(f"{self.model_path}: cannot create a session ({first})") from None

    def _prepare_base(self, sess_options: ort.SessionOptions):
        """The stripped base model and its large initializers as OrtValues, added to ``sess_options``.

        Both sessions are created from ``sess_options``, so both take those initializers from the same
        OrtValues instead of loading their own copies.
        """
        from .base_path import shared_initializers, strip_branches
        from .onnx_model import load_model

        # Checked like every model we read: external data inside its folder, regular files.
        model = load_model(self.model_path)
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
        with self._lock:
            return sorted(self._adapters)

    @property
    def slots(self) -> dict[str, Slot]:
        return self.manifest.slots

    def load_adapter(self, name: str, source: str | os.PathLike | Adapter | Mapping[str, np.ndarray]) -> None:
        """Validate and place an adapter on the device under ``name``.

        ``source``: a ``.onnx_adapter`` or ``.safetensors`` file of slot tensors, a PEFT adapter directory
        or ``Adapter`` (converted in memory), or a dict of slot tensors.
        """
        if not name or not isinstance(name, str):
            raise AdapterError("an adapter needs a non-empty name")
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
        tensors, what = self._tensors_of(source)
        check_tensors(tensors, self.manifest, what)
        self._check_dtypes(tensors, what)
        # Files and dicts come from anywhere: NaN/Inf in a slot would turn every output NaN, silently.
        check_finite_tensors(tensors, what)
        values = {k: self._ort_value(v) for k, v in sorted(tensors.items())}
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
            self._adapters[name] = values

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; runs already in flight keep their references and finish normally."""
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise AdapterError(f"no adapter named {name!r} is loaded")

    def _tensors_of(self, source) -> tuple[dict[str, np.ndarray], str]:
        if isinstance(source, Mapping):
            return {k: np.asarray(v) for k, v in source.items()}, "adapter tensors"
        if isinstance(source, Adapter):
            return adapter_tensors(source, self.manifest, self._read_weight()), f"adapter {source.name!r}"
        path = Path(source)
        if path.is_dir():
            from .peft_format import load_adapter

            adapter = load_adapter(path)
            return adapter_tensors(adapter, self.manifest, self._read_weight()), f"adapter {adapter.name!r}"
        return read_adapter_tensors(path), str(path)

    def _read_weight(self) -> Callable[[Slot], np.ndarray]:
        from .convert import weight_reader

        return weight_reader(self.model_path)

    def _check_dtypes(self, tensors: Mapping[str, np.ndarray], what: str) -> None:
        # The manifest has the dtype too; the session's own input types are the final word.
        for k, v in tensors.items():
            if k not in self._types:
                raise AdapterError(f"{what}: the model has no input {k!r} (its slot metadata does not match its graph)")
            want = _ORT_TYPES.get(self._types[k])
            if want is None or v.dtype != want:
                raise AdapterError(f"{what}: {k} has dtype {v.dtype}, the model expects {self._types[k]}")

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
        feeds: Mapping[str, np.ndarray],
        adapter: str | None = None,
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray]:
        """Run with the named adapter active (None: the base model); returns numpy outputs."""
        values: dict[str, ort.OrtValue] = {}
        if adapter is not None:
            with self._lock:
                found = self._adapters.get(adapter)
            if found is None:
                raise AdapterError(f"no adapter named {adapter!r} is loaded")
            values = found
        session = self.session
        if adapter is None and self.base_session is not None and self._slot_inputs.isdisjoint(feeds):
            session = self.base_session
        binding = session.io_binding()
        for k, v in feeds.items():
            if k not in self._inputs:
                raise LoraExportError(f"unknown model input {k!r}")
            binding.bind_cpu_input(k, np.ascontiguousarray(v))
        for k, v in values.items():
            binding.bind_ortvalue_input(k, v)
        for name in output_names or self._outputs:
            binding.bind_output(name)
        try:
            session.run_with_iobinding(binding, run_options)
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise LoraExportError(f"inference failed: {first}") from None
        if self.device_type == "cpu":
            # Zero-copy views of ORT's output buffers; copy_outputs_to_cpu would copy every output once more.
            return [v.numpy() for v in binding.get_outputs()]
        return binding.copy_outputs_to_cpu()

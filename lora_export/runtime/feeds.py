"""What ``LoraSession.run`` accepts, checked as ONNX Runtime would (and a little more): output names, and
feeds that are every user input once, of the model's dtype (nothing is cast), rank and fixed dimensions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np
import onnxruntime as ort

from ..errors import DtypeError, LoraExportError, ShapeError, one_line

# ONNX Runtime's tensor type names and the numpy dtypes that feed them (nothing is cast: a feed must match).
ORT_TYPES = {
    "tensor(bfloat16)": np.dtype(ml_dtypes.bfloat16),
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}
_SHOWN = 20  # names listed in an error before "..."


def listed(names: Iterable[str]) -> str:
    """Names for an error message: the first few, then how many in all."""
    names = list(names)
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "") if names else "none"


def requested_outputs(output_names, outputs: list[str]) -> list[str]:
    """The output names to fetch: all for None or empty, as ONNX Runtime; unknown ones refused by name."""
    if output_names is None:
        return outputs
    if isinstance(output_names, (str, bytes)) or not isinstance(output_names, Iterable):
        raise LoraExportError(
            f"output_names must be a list of output names or None, not {type(output_names).__name__} "
            f"(the model's outputs: {listed(outputs)})"
        )
    names = list(output_names)
    if not names:
        return outputs
    unknown = [n for n in names if not isinstance(n, str) or n not in outputs]
    if unknown:
        raise LoraExportError(
            f"unknown output name{'s' if len(unknown) > 1 else ''} {listed(map(repr, unknown))} "
            f"(the model's outputs: {listed(outputs)})"
        )
    return names


def checked_feeds(
    feeds, inputs: Mapping[str, ort.NodeArg], slot_inputs: set[str]
) -> dict[str, np.ndarray | ort.OrtValue]:
    """Every user input, present once, of the model's dtype and rank, fixed dimensions matching."""
    if not isinstance(feeds, Mapping):
        raise LoraExportError(f"feeds must be a dict of input name to array, not {type(feeds).__name__}")
    for k in feeds:
        if k in slot_inputs:
            raise LoraExportError(
                f"{k!r} is a LoRA slot input: load its tensors as an adapter (load_adapter) and run with adapter=<name>"
            )
        if k not in inputs:
            raise LoraExportError(f"unknown model input {k!r} (the model's inputs: {listed(inputs)})")
    missing = [k for k in inputs if k not in feeds]
    if missing:
        raise LoraExportError(
            f"missing model input{'s' if len(missing) > 1 else ''} {listed(map(repr, missing))} "
            f"(the model's inputs: {listed(inputs)})"
        )
    bound: dict[str, np.ndarray | ort.OrtValue] = {}
    for k, v in feeds.items():
        arg = inputs[k]
        if isinstance(v, ort.OrtValue):
            given, shape = v.data_type(), list(v.shape())
            if given != arg.type:
                raise DtypeError(f"input {k!r} is a {given} OrtValue, the model expects {arg.type}")
        else:
            try:
                v = np.asarray(v)
            except Exception as e:  # noqa: BLE001 - ragged lists and the like
                raise LoraExportError(f"input {k!r}: not an array ({one_line(e)})") from None
            want = ORT_TYPES.get(arg.type)
            if want is not None and v.dtype != want:
                raise DtypeError(
                    f"input {k!r} has dtype {v.dtype}, the model expects {want} ({arg.type}); nothing is cast"
                )
            if not v.flags.c_contiguous:
                v = np.ascontiguousarray(v)  # keeps 0-d arrays 0-d (ascontiguousarray alone makes them 1-d)
            shape = list(v.shape)
        _check_shape(k, shape, arg.shape)
        bound[k] = v
    return bound


def _check_shape(name: str, shape: list[int], declared: list | None) -> None:
    if declared is None:
        return
    fixed = [d if isinstance(d, int) else (d or "?") for d in declared]
    if len(shape) != len(declared) or any(isinstance(d, int) and d >= 0 and d != n for d, n in zip(declared, shape)):
        raise ShapeError(f"input {name!r} has shape {tuple(shape)}, the model expects {tuple(fixed)}")


def batch_size(bound: Mapping, inputs: Mapping[str, ort.NodeArg]) -> int | None:
    """The batch size: the leading dimension of the first fed input whose declared leading dimension is symbolic."""
    for k, v in bound.items():
        declared = inputs[k].shape
        if declared and not isinstance(declared[0], int):
            shape = v.shape() if isinstance(v, ort.OrtValue) else v.shape
            return int(shape[0]) if len(shape) else None
    return None


def run_bound(
    session, names: list[str], bound: Mapping, values: Mapping, run_options, *, on_cpu: bool
) -> list[np.ndarray]:
    """Run ``session`` with IOBinding: the user feeds ``bound``, the LoRA inputs ``values``; outputs ``names``."""
    binding = session.io_binding()
    for k, v in bound.items():
        if isinstance(v, ort.OrtValue):
            binding.bind_ortvalue_input(k, v)
        else:
            binding.bind_cpu_input(k, v)
    for k, v in values.items():
        # Inputs with a default are not in the binding's input list: numpy must come as an OrtValue.
        binding.bind_ortvalue_input(k, v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v))
    unique = list(dict.fromkeys(names))  # ONNX Runtime allows repeats; a binding holds each output once
    for name in unique:
        binding.bind_output(name)
    try:
        session.run_with_iobinding(binding, run_options)
    except Exception as e:  # noqa: BLE001
        raise LoraExportError(f"inference failed: {one_line(e)}") from None
    if on_cpu:
        # Zero-copy views of ORT's output buffers; copy_outputs_to_cpu would copy every output once more.
        results = [v.numpy() for v in binding.get_outputs()]
    else:
        results = binding.copy_outputs_to_cpu()
    if len(unique) == len(names):
        return results
    by_name = dict(zip(unique, results))
    seen: set[str] = set()
    out = []
    for name in names:  # a repeated name gets its own copy, as ONNX Runtime's run gives
        out.append(by_name[name].copy() if name in seen else by_name[name])
        seen.add(name)
    return out

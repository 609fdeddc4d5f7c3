"""Export a torch model to ONNX with a manifest mapping each targetable module to its initializer.

The caller's model is never touched: we export a deep copy, with any LoRA wrappers removed (the base
model is what gets deployed; adapters are merged or injected into the ONNX graph later). Exporters
rename and re-layout weights (``fc.weight`` becomes a transposed ``val_3``), so the manifest is built
while the torch model is still in hand: by initializer name first, then by exact value fingerprint.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import temp_dir
from .errors import LoraExportError, first_line
from .export_manifest import MANIFEST_KEY, build_manifest
from .onnx_model import INLINE_LIMIT_BYTES, initializer_bytes, load_model, save_model


@dataclass
class ExportResult:
    """What ``export_with_manifest`` wrote: the model path, its manifest, and modules left unmapped."""

    path: Path
    exporter: str
    manifest: dict
    unmapped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "exporter": self.exporter,
            "mapped": len(self.manifest["modules"]),
            "unmapped": list(self.unmapped),
            "modules": self.manifest["modules"],
        }


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamo: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping | None = None,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    external_data: bool | None = None,
) -> Path:
    """Export the base of ``model`` to ONNX at ``path`` and embed the LoRA target manifest.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    ``dynamo=False`` uses the TorchScript exporter. ``external_data`` None writes external data only
    when the weights would not fit in one protobuf. The caller's model is not modified (not even its
    training flag); LoRA wrappers are removed from the exported copy, unmerged. Returns the path.
    """
    return export_with_manifest(
        model,
        example_inputs,
        path,
        dynamo=dynamo,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        dynamic_shapes=dynamic_shapes,
        opset=opset,
        external_data=external_data,
    ).path


def export_with_manifest(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    dynamo: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping | None = None,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    external_data: bool | None = None,
) -> ExportResult:
    """``export``, returning the manifest and the targetable modules no initializer was found for."""
    if not isinstance(model, nn.Module):
        raise LoraExportError(f"export needs a torch.nn.Module, got {type(model).__name__}")
    out = Path(path)
    base = base_copy(model)
    args, kwargs = _split_inputs(example_inputs)
    if input_names is None and kwargs:
        # TorchScript would name keyword inputs input.1, input.2 ...; keep the caller's names.
        input_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    options: dict[str, Any] = {"input_names": list(input_names) if input_names else None}
    if output_names:
        options["output_names"] = list(output_names)
    if opset is not None:
        options["opset_version"] = int(opset)
    if dynamic_axes is not None:
        options["dynamic_axes"] = dict(dynamic_axes)
    if dynamic_shapes is not None:
        options["dynamic_shapes"] = dynamic_shapes
    out.parent.mkdir(parents=True, exist_ok=True)
    # Export into a private folder beside the output so that nothing appears at ``out`` unless
    # the whole export, manifest and save succeed; external data written by torch stays there.
    with temp_dir(out.parent) as tmp:
        tmp_model = tmp / "exported.onnx"
        _run_exporter(base, args, kwargs, tmp_model, dynamo=dynamo, options=options)
        onnx_model = load_model(tmp_model)
        manifest, unmapped = build_manifest(onnx_model, base)
        onnx_model.metadata_props[MANIFEST_KEY] = json.dumps(manifest, sort_keys=True)
        if external_data is None:
            external_data = initializer_bytes(onnx_model) > INLINE_LIMIT_BYTES
        save_model(onnx_model, out, external=external_data)
    return ExportResult(out, "dynamo" if dynamo else "torchscript", manifest, unmapped)


def base_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every LoRA wrapper replaced by its (unmerged) base."""
    try:
        base = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - deepcopy surfaces whatever the model's members raise
        raise LoraExportError(f"cannot copy the model for export ({type(e).__name__}: {first_line(e)})") from None
    base = _unwrap_lora(base)
    base.eval()
    config = getattr(base, "config", None)
    if getattr(config, "use_cache", False):
        # transformers' KV-cache objects are not exportable outputs; a deployment graph without
        # past key/values is what the ONNX stages expect.
        config.use_cache = False
    return base


def _unwrap_lora(model: nn.Module) -> nn.Module:
    try:
        from .layers import LoraLayer
    except ImportError:  # the training layers are optional for export
        return model
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    if not wrapped:
        return model
    for layer in wrapped.values():
        if getattr(layer, "merged", False):
            layer.unmerge()
    root = wrapped.pop("", None)
    for name, layer in wrapped.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer.base_layer)
    for attr in ("_lora_export_config",):  # attach_lora's bookkeeping; meaningless on the base
        if hasattr(model, attr):
            delattr(model, attr)
    return root.base_layer if root is not None else model


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict | None]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), None
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), None
    raise LoraExportError(
        f"example inputs must be a tensor, a tuple of tensors or a dict, got {type(example_inputs).__name__}"
    )


_FAILURE_LOGGERS = ("torch._subclasses.fake_tensor", "torch.export._trace", "torch._export", "torch.fx.experimental")


def _run_exporter(
    model: nn.Module, args: tuple, kwargs: dict | None, path: Path, *, dynamo: bool, options: dict
) -> None:
    # torch prints progress to stdout; keep stdout clean for --json output. Its registry also logs a
    # warning per torchvision op it cannot find, which says nothing about the user's model.
    sink = io.StringIO()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    # A failing torch.export logs the failure's traceback (fake tensors, the tracer) on stderr before
    # raising; the exception is reported in one line below, so those logs are only noise.
    quiet = {name: logging.CRITICAL for name in _FAILURE_LOGGERS}
    quiet[registry_log.name] = logging.ERROR
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)
    try:
        with contextlib.redirect_stdout(sink), torch.no_grad(), warnings.catch_warnings():
            # torch.export's own deprecation notices are not actionable for our users.
            warnings.simplefilter("ignore", FutureWarning)
            if dynamo:
                program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, verbose=False, **options)
                program.save(str(path))
            else:
                options = {k: v for k, v in options.items() if k != "dynamic_shapes"}
                # The TorchScript exporter takes keyword inputs as a trailing dict in ``args``.
                ts_args = (*args, kwargs) if kwargs else args
                torch.onnx.export(model, ts_args, str(path), dynamo=False, verbose=False, **options)
    except LoraExportError:
        raise
    except Exception as e:  # noqa: BLE001 - exporters raise anything from anywhere
        which = "dynamo" if dynamo else "TorchScript"
        raise LoraExportError(f"{which} export failed: {_cause(e)}") from None
    finally:
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)
    if not path.is_file():
        raise LoraExportError("export failed: the exporter wrote no model")


def _cause(e: BaseException) -> str:
    # The dynamo exporter wraps the real reason ("step 1/3 failed ..."); name the innermost cause too.
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = f"{type(e).__name__}: {first_line(e)}"
    if root is not e:
        text += f" (caused by {type(root).__name__}: {first_line(root)})"
    return text


def load_factory(spec: str) -> tuple[nn.Module, Any, dict]:
    """Call ``module:function`` (importable from the current directory) → (model, inputs, export kwargs)."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise LoraExportError(f"expected MODULE:FUNCTION, got {spec!r}")
    import importlib

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - user code raises anything while importing
        raise LoraExportError(f"cannot import {module_name!r}: {type(e).__name__}: {first_line(e)}") from None
    func = mod
    for part in func_name.split("."):
        func = getattr(func, part, None)
        if func is None:
            raise LoraExportError(f"{module_name!r} has no attribute {func_name!r}")
    if not callable(func):
        raise LoraExportError(f"{spec} is not callable")
    try:
        result = func()
    except Exception as e:  # noqa: BLE001
        raise LoraExportError(f"{spec}() failed: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise LoraExportError(f"{spec}() must return (model, example_inputs) or (model, example_inputs, kwargs)")
    model, inputs = result[0], result[1]
    kwargs = dict(result[2]) if len(result) == 3 and result[2] else {}
    return model, inputs, kwargs

"""Export a torch model to ONNX with a manifest mapping each targetable module to its initializer.

The caller's model is never touched: we export a deep copy, with any LoRA wrappers removed (the base
model is what gets deployed; adapters are merged or injected into the ONNX graph later). Exporters
rename and re-layout weights (``fc.weight`` becomes a transposed ``val_3``), so the manifest is built
while the torch model is still in hand: by initializer name first, then by exact value fingerprint.

The exported graph serves: inputs and outputs carry the model's names (``input_ids``, ``logits``), and
batch and sequence dimensions are dynamic unless the model bakes them in (``export_shapes``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoraExportError, first_line
from ..files.atomic import temp_dir
from ..graph.model.model_io import INLINE_LIMIT_BYTES, initializer_bytes, load_model, save_model
from .factory import load_factory
from .keep import foldable_parameters, optimize_keeping
from .manifest import MANIFEST_KEY, build_manifest
from .quiet import native_stdout_silenced, quiet
from .shapes import (
    InputSpec,
    dynamic_axes_of,
    dynamic_shapes_of,
    graph_axes,
    input_specs,
    merge_sequences,
    onnx_serves,
    output_leaves,
    propose_axes,
    refuse_cache_output,
    rename_dims,
    sequence_labels,
    signature_order,
    torch_at_grown,
    widened,
)

__all__ = ["MANIFEST_KEY", "ExportResult", "base_copy", "export", "export_with_manifest", "load_factory"]

# Opsets each exporter can be asked for. Dynamo's operators exist from opset 18 (torchlib's) up; below it
# torch converts the finished graph down, which fails or silently loses what we check for (GPT-2 at 17
# came out with every dimension static), so it is refused with what works instead. The saved model's
# opset is checked too: a conversion that did not happen is an error, not a surprise.
_OPSETS = {False: (7, 20), True: (18, 23)}


@dataclass
class ExportResult:
    """What ``export_with_manifest`` wrote: the model path, its manifest, and modules left unmapped."""

    path: Path
    exporter: str
    manifest: dict
    unmapped: list[str] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    #: {input: {axis: dimension name}}: the input dimensions left dynamic (empty: fixed shapes).
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "exporter": self.exporter,
            "mapped": len(self.manifest["modules"]),
            "unmapped": list(self.unmapped),
            "modules": self.manifest["modules"],
            "inputs": list(self.input_names),
            "outputs": list(self.output_names),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()},
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
    dynamic: bool = True,
) -> Path:
    """Export the base of ``model`` to ONNX at ``path`` and embed the LoRA target manifest.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    ``dynamo=False`` uses the TorchScript exporter. ``external_data`` None writes external data only
    when the weights would not fit in one protobuf. The caller's model is not modified (not even its
    training flag); LoRA wrappers are removed from the exported copy, unmerged. Returns the path.

    Inputs are named after ``forward``'s parameters, outputs after the model's output fields (``logits``,
    ``last_hidden_state``; ``output_0``… for tuples, ``output`` for one tensor); given names win.
    ``dynamic`` (default): dim 0 of every input is ``batch`` and dim 1 of token inputs ``sequence``,
    each kept only if the exported model, run at other sizes, agrees with the torch model there.
    ``dynamic=False`` exports the example's shapes; given ``dynamic_axes``/``dynamic_shapes`` win.
    ``opset``: exactly that default-domain opset, or an error.
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
        dynamic=dynamic,
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
    dynamic: bool = True,
) -> ExportResult:
    """``export``, returning the manifest and the targetable modules no initializer was found for."""
    if not isinstance(model, nn.Module):
        raise LoraExportError(f"export needs a torch.nn.Module, got {type(model).__name__}")
    out = Path(path)
    base = base_copy(model)
    args, kwargs = _split_inputs(example_inputs)
    kwargs = signature_order(base, kwargs)
    opset = check_opset_request(opset, dynamo)
    specs = input_specs(base, args, kwargs, list(input_names) if input_names else None)
    with quiet():
        reference = _forward(base, args, kwargs)
    leaves = output_leaves(reference)
    refuse_cache_output(reference)
    out_names = list(output_names) if output_names else (leaves[0] if leaves else None)
    options: dict[str, Any] = {"input_names": [s.name for s in specs] or None}
    if out_names:
        options["output_names"] = out_names
    if opset is not None:
        options["opset_version"] = opset
    user_shapes = dynamic_axes is not None or dynamic_shapes is not None
    if dynamic_axes is not None:
        options["dynamic_axes"] = dict(dynamic_axes)
    if dynamic_shapes is not None:
        options["dynamic_shapes"] = dynamic_shapes
    # Proposals, most dynamic first; each is checked at grown shapes, the last (static) is not.
    attempts: list[bool | None] = [None]
    if dynamic and not user_shapes:
        propose_axes(specs)
        if len(sequence_labels(specs)) > 1 and _torch_fails_apart(base, args, kwargs, specs):
            merge_sequences(specs)
        attempts = [True, False, None] if sequence_labels(specs) else [False, None]
        if not any(s.axes for s in specs):
            attempts = [None]
    # Export into a private folder beside the output so that nothing appears at ``out`` unless
    # the whole export, manifest and save succeed; external data written by torch stays there. The
    # folders it creates for that go again when the export fails.
    with temp_dir(out.parent) as tmp, quiet():
        for n, attempt in enumerate(attempts):
            last = n == len(attempts) - 1
            tmp_model = tmp / f"exported{n}.onnx"
            trial = _restrict(specs, attempt)
            targs, tkwargs, opts = args, kwargs, dict(options)
            wide = widened(args, kwargs, trial) if attempt is not None else None
            if wide is not None:  # traced at other sizes, checked at the example's own below
                targs, tkwargs, trial = wide
            if attempt is not None:
                if dynamo:
                    shapes = dynamic_shapes_of(base, targs, tkwargs, trial)
                    opts["dynamic_shapes" if shapes is not None else "dynamic_axes"] = (
                        shapes if shapes is not None else dynamic_axes_of(trial, None, None)
                    )
                else:
                    try:
                        traced = leaves if wide is None else output_leaves(_forward(base, targs, tkwargs))
                    except LoraExportError:  # the model cannot take the trace sizes: a less dynamic proposal
                        continue
                    opts["dynamic_axes"] = dynamic_axes_of(trial, out_names, traced[1] if traced else None)
                # A dimension the torch model itself cannot vary is not worth an export.
                probe = torch_at_grown(base, targs, tkwargs, trial, {s.name: dict(s.axes) for s in trial})
                if probe is None:
                    continue
            try:
                _run_exporter(base, targs, tkwargs, tmp_model, dynamo=dynamo, options=opts)
            except LoraExportError:
                if last:
                    raise
                continue
            axes = _finish_graph(tmp_model, trial, opset, dynamo)
            if attempt is None or not axes or last:
                break
            if axes != {s.name: s.axes for s in trial if s.axes}:  # the exporter kept some static, or split names
                probe = torch_at_grown(base, targs, tkwargs, trial, axes)
            example = {s.name: s.tensor.detach().cpu().numpy() for s in specs}
            if (
                probe is not None
                and onnx_serves(tmp_model, *probe, out_names)
                and (wide is None or onnx_serves(tmp_model, example, leaves, out_names))
            ):
                break
        onnx_model = load_model(tmp_model)
        manifest, unmapped = build_manifest(onnx_model, base)
        onnx_model.metadata_props[MANIFEST_KEY] = json.dumps(manifest, sort_keys=True)
        if external_data is None:
            external_data = initializer_bytes(onnx_model) > INLINE_LIMIT_BYTES
        save_model(onnx_model, out, external=external_data)
    io_names = ([v.name for v in onnx_model.graph.inputs], [v.name for v in onnx_model.graph.outputs])
    return ExportResult(out, "dynamo" if dynamo else "torchscript", manifest, unmapped, *io_names, axes)


def _restrict(specs: list[InputSpec], attempt: bool | None) -> list[InputSpec]:
    """The proposal for one attempt: True all axes, False batch only, None none."""
    keep = {True: lambda a: True, False: lambda a: a == 0, None: lambda a: False}[attempt]
    return [InputSpec(s.name, s.param, s.tensor, {a: v for a, v in s.axes.items() if keep(a)}) for s in specs]


def _torch_fails_apart(base: nn.Module, args: tuple, kwargs: dict | None, specs: list[InputSpec]) -> bool:
    """Does the torch model fail when its sequence groups (encoder, decoder) have different lengths?"""
    with quiet():
        return torch_at_grown(base, args, kwargs, specs, {s.name: dict(s.axes) for s in specs}) is None


def _forward(model: nn.Module, args: tuple, kwargs: dict | None) -> Any:
    try:
        with torch.no_grad():
            return model(*args, **(kwargs or {}))
    except Exception as e:  # noqa: BLE001 - the user's model raises anything
        raise LoraExportError(f"export failed: the model fails on its example inputs ({_cause(e)})") from None


def check_opset_request(opset: int | None, dynamo: bool) -> int | None:
    """``opset`` if the exporter can write exactly it, else a one-line error that says what works."""
    if opset is None:
        return None
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise LoraExportError(f"opset must be an integer, got {opset!r}")
    low, high = _OPSETS[dynamo]
    if not low <= opset <= high:
        which = "dynamo" if dynamo else "TorchScript"
        other_low, other_high = _OPSETS[not dynamo]
        if other_low <= opset <= other_high:  # the other exporter writes it: say so
            how = "use the TorchScript exporter (--torchscript)" if dynamo else "use dynamo (no --torchscript)"
            fix = f"{how}, or an opset from {low} to {high}"
        else:
            fix = f"ask for an opset from {low} to {high}"
        why = " (below that it converts the finished graph down, which fails or loses dynamic dimensions)"
        raise LoraExportError(
            f"cannot export opset {opset}: the {which} exporter supports opsets {low} to {high}"
            f"{why if dynamo and opset < low else ''}; {fix}"
        )
    return opset


def _finish_graph(path: Path, specs: list[InputSpec], opset: int | None, dynamo: bool) -> dict:
    """Check the produced opset, name the dynamic dimensions; returns {input: {axis: dim name}}."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    produced = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and produced != opset:
        which = "dynamo" if dynamo else "TorchScript"
        raise LoraExportError(f"cannot export opset {opset}: the {which} exporter produced opset {produced}")
    if dynamo and rename_dims(proto, specs):
        onnx.save(proto, str(path))
    return graph_axes(proto)


def base_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every LoRA wrapper replaced by its (unmerged) base."""
    try:
        base = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - deepcopy surfaces whatever the model's members raise
        raise LoraExportError(f"cannot copy the model for export ({type(e).__name__}: {first_line(e)})") from None
    base = _unwrap_lora(base)
    base.eval()
    for module in base.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False):
            # transformers' KV-cache objects are not exportable outputs; a deployment graph without
            # past key/values is what the ONNX stages expect. Every sub-model's config: T5's decoder
            # has its own, which the top-level flag does not reach.
            config.use_cache = False
    return base


def _unwrap_lora(model: nn.Module) -> nn.Module:
    try:
        from ..training.layers import LoraLayer
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


def _run_exporter(
    model: nn.Module, args: tuple, kwargs: dict | None, path: Path, *, dynamo: bool, options: dict
) -> None:
    # torch prints progress to stdout, and its C++ side dumps whole graphs there on failure: keep stdout
    # clean for --json output and the one-line error.
    sink = io.StringIO()
    try:
        with native_stdout_silenced(), contextlib.redirect_stdout(sink), torch.no_grad():
            if dynamo:
                # Optimized by us (``optimize_keeping``), so that no weight an adapter may replace is folded away.
                program = torch.onnx.export(
                    model, args, kwargs=kwargs, dynamo=True, verbose=False, optimize=False, **options
                )
                optimize_keeping(program, foldable_parameters(model))
                program.save(str(path))
            else:
                options = {k: v for k, v in options.items() if k != "dynamic_shapes"}
                with _positional(model, args, kwargs) as ts_args:
                    torch.onnx.export(model, ts_args, str(path), dynamo=False, verbose=False, **options)
    except LoraExportError:
        raise
    except Exception as e:  # noqa: BLE001 - exporters raise anything from anywhere
        which = "dynamo" if dynamo else "TorchScript"
        raise LoraExportError(f"{which} export failed: {_cause(e)}") from None
    if not path.is_file():
        raise LoraExportError("export failed: the exporter wrote no model")


@contextlib.contextmanager
def _positional(model: nn.Module, args: tuple, kwargs: dict | None) -> Iterator[tuple]:
    """TorchScript traces positional tensors only, and would pass a trailing dict's keys by position
    (clashing with decorated HF forwards): give the private copy a forward taking keyword tensors in order."""
    if not kwargs:
        yield args
        return
    tensors = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if k not in tensors}
    forward, n = model.forward, len(args)

    def positional_forward(*values):
        return forward(*values[:n], **fixed, **dict(zip(tensors, values[n:])))

    model.forward = positional_forward
    try:
        yield (*args, *(kwargs[k] for k in tensors))
    finally:
        del model.forward


def _cause(e: BaseException) -> str:
    # The dynamo exporter wraps the real reason ("step 1/3 failed ..."); name the innermost cause too.
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = f"{type(e).__name__}: {first_line(e)}"
    if root is not e:
        text += f" (caused by {type(root).__name__}: {first_line(root)})"
    return text

"""What an exported model's inputs, outputs and dimensions are called, and which dimensions may vary.

Names follow the model, as Optimum does: inputs after ``forward``'s parameters (keyword examples keep
their keys), outputs after the model's output fields (``logits``, ``last_hidden_state``, dict keys;
``output_0`` … for tuples, ``output`` for a single tensor). Dimension 0 of every tensor input is
``batch``; dimension 1 of a token-like input (``input_ids``, ``attention_mask`` …) is ``sequence``.
A dimension is only proposed here: the caller exports, then ``check_shapes`` runs the ONNX model at
other sizes against the torch model, and a dimension the model bakes in is exported static instead.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LoraExportError

BATCH, SEQUENCE, DECODER_SEQUENCE = "batch", "sequence", "decoder_sequence"
TOKEN_INPUTS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "position_ids",
        "decoder_input_ids",
        "decoder_attention_mask",
        "decoder_position_ids",
        "labels",
        "special_tokens_mask",
        "global_attention_mask",
    }
)
# How much each dimension grows when the exported model is checked at another shape: each named
# dimension by its own amount, so that two dimensions the graph wrongly calls equal are caught.
_GROWTH = {BATCH: (1, 1), SEQUENCE: (3, 2)}  # (first, step) for batch-like and sequence-like dimensions


@dataclass
class InputSpec:
    """One tensor input of the exported graph: its ONNX name, the forward parameter it feeds, its example."""

    name: str
    param: str
    tensor: torch.Tensor
    axes: dict[int, str] = field(default_factory=dict)


def forward_params(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def signature_order(model: nn.Module, kwargs: dict | None) -> dict | None:
    """Keyword inputs in ``forward``'s parameter order (torch.export orders the graph's inputs so),
    the ones ``**kwargs`` takes after them in the caller's order."""
    sig = forward_params(model)
    if not kwargs or sig is None:
        return kwargs
    order = {name: i for i, name in enumerate(sig.parameters)}
    return dict(sorted(kwargs.items(), key=lambda kv: order.get(kv[0], len(order))))


def input_specs(model: nn.Module, args: tuple, kwargs: dict | None, names: list[str] | None) -> list[InputSpec]:
    """The tensor inputs in graph order (positional, then keyword), named after ``forward`` unless ``names``."""
    sig = forward_params(model)
    positional = []
    if sig is not None:
        for p in sig.parameters.values():
            if p.kind is p.VAR_POSITIONAL:
                break
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                positional.append(p.name)
    specs = []
    for i, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            param = positional[i] if i < len(positional) else f"input_{i}"
            specs.append(InputSpec(param, param, value))
    for key, value in (kwargs or {}).items():
        if isinstance(value, torch.Tensor):
            specs.append(InputSpec(key, key, value))
    for spec, name in zip(specs, names or ()):
        spec.name = name
    return specs


def propose_axes(specs: list[InputSpec], *, sequence: bool = True) -> None:
    """Mark dim 0 of each input ``batch`` and dim 1 of token-like inputs ``sequence`` (not empty ones;
    a size of 1 is traced at 2, see ``widened``)."""
    tokens = [s for s in specs if sequence and s.tensor.ndim >= 2 and s.tensor.shape[1] >= 1 and _token_like(s)]
    for spec in specs:
        t, axes = spec.tensor, {}
        if t.ndim >= 1 and t.shape[0] >= 1:
            axes[0] = BATCH
        if any(spec is s for s in tokens):
            axes[1] = sequence_label(spec, alone=len(tokens) == 1)
        spec.axes = axes


def sequence_label(spec: InputSpec, alone: bool = False) -> str:
    """The proposed name of an input's length: ``decoder_sequence`` for a decoder's inputs, ``sequence``
    for the other known token inputs (or a lone one), ``<name>_sequence`` for an input we know nothing of.

    One name tells ONNX Runtime the lengths are equal: an encoder-decoder's two lengths are not. Inputs
    of one group (ids and their mask) are equal by their meaning; groups are checked to vary apart."""
    if spec.name.startswith("decoder_") or spec.param.startswith("decoder_"):
        return DECODER_SEQUENCE
    if alone or spec.param in TOKEN_INPUTS or spec.name in TOKEN_INPUTS:
        return SEQUENCE
    return f"{spec.name}_{SEQUENCE}"


def sequence_labels(specs: list[InputSpec]) -> set[str]:
    return {label for s in specs for axis, label in s.axes.items() if axis != 0}


def merge_sequences(specs: list[InputSpec]) -> None:
    """One ``sequence`` for every token input: for a model whose code needs all its lengths equal."""
    for s in specs:
        s.axes = {a: (label if a == 0 else SEQUENCE) for a, label in s.axes.items()}


def _token_like(spec: InputSpec) -> bool:
    if spec.param in TOKEN_INPUTS or spec.name in TOKEN_INPUTS:
        return True
    # Integer (or boolean) 2-D inputs are token ids or masks in any model that takes tokens.
    return spec.tensor.ndim == 2 and not spec.tensor.is_floating_point() and not spec.tensor.is_complex()


def dynamic_axes_of(specs: list[InputSpec], out_names: list[str] | None, outputs: list[torch.Tensor] | None) -> dict:
    """TorchScript ``dynamic_axes``: the inputs' axes, and output axes whose size matches a dynamic size."""
    axes = {s.name: dict(s.axes) for s in specs if s.axes}
    sizes: dict[str, int] = {}
    for s in specs:
        for axis, label in s.axes.items():
            sizes.setdefault(label, int(s.tensor.shape[axis]))
    if out_names and outputs and len(out_names) == len(outputs):
        for name, t in zip(out_names, outputs):
            found = {}
            if t.ndim >= 1 and sizes.get(BATCH) == t.shape[0]:
                found[0] = BATCH
            # An output's length is named only when one input length has its size (else it is ambiguous).
            lengths = [label for label, n in sizes.items() if label != BATCH and t.ndim >= 2 and n == t.shape[1]]
            if len(lengths) == 1:
                found[1] = lengths[0]
            if found:
                axes[name] = found
    return axes


def dynamic_shapes_of(model: nn.Module, args: tuple, kwargs: dict | None, specs: list[InputSpec]) -> Any:
    """torch.export ``dynamic_shapes`` (``Dim.AUTO`` on the proposed axes), keyed by ``forward``'s parameters.

    ``Dim.AUTO`` lets torch.export keep a dimension static when the model's code fixes it; the symbols it
    makes are renamed to ``batch``/``sequence`` in the saved graph (``rename_dims``)."""
    auto = torch.export.Dim.AUTO
    by_param = {s.param: {a: auto for a in s.axes} or None for s in specs}
    sig = forward_params(model)
    if sig is None:
        return None
    try:
        bound = sig.bind(*args, **(kwargs or {}))
    except TypeError:
        return None
    shapes: dict[str, Any] = {}
    for i, (param, value) in enumerate(bound.arguments.items()):
        kind = sig.parameters[param].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            shapes[param] = {k: (by_param.get(k) if isinstance(v, torch.Tensor) else None) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            start = i
            shapes[param] = tuple(
                by_param.get(f"input_{start + j}") if isinstance(v, torch.Tensor) else None for j, v in enumerate(value)
            )
        else:
            shapes[param] = by_param.get(param) if isinstance(value, torch.Tensor) else None
    return shapes


def rename_dims(proto, specs: list[InputSpec]) -> dict[str, str]:
    """Rename the exporter's dimension symbols on the proposed input axes to ``batch``/``sequence``.

    Works on an ``onnx.ModelProto`` in place (inputs, outputs, value_info); returns {old symbol: new name}."""
    mapping: dict[str, str] = {}
    by_name = {vi.name: vi for vi in proto.graph.input}
    for spec in specs:
        vi = by_name.get(spec.name)
        if vi is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        for axis, label in spec.axes.items():
            if axis < len(dims) and dims[axis].dim_param:
                # torch.export may give each input's batch its own symbol (GPT-2's mask and ids): the
                # proposal's label is the name. One symbol on two labels is one dimension torch.export
                # proved equal: it keeps the first.
                mapping.setdefault(dims[axis].dim_param, label)
    if not mapping:
        return {}
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in sorted(mapping, key=len, reverse=True)) + r")\b")
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        if not vi.type.HasField("tensor_type"):
            continue
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: mapping[m.group(1)], dim.dim_param)
    return mapping


def graph_axes(proto) -> dict[str, dict[int, str]]:
    """The saved graph's symbolic input dimensions: {input: {axis: dim_param}}."""
    found: dict[str, dict[int, str]] = {}
    for vi in proto.graph.input:
        if vi.type.HasField("tensor_type"):
            for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
                if dim.dim_param:
                    found.setdefault(vi.name, {})[axis] = dim.dim_param
    return found


# -- outputs -----------------------------------------------------------------------------------


class _Unnamed(Exception):
    pass


def output_leaves(out: Any) -> tuple[list[str], list[torch.Tensor]] | None:
    """Names and tensors of the model's outputs in the exporters' flattening order; None if unnameable."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []

    def walk(value: Any, name: str) -> None:
        if value is None:
            return
        if isinstance(value, torch.Tensor):
            names.append(name)
            tensors.append(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{name}_{k}")
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                walk(v, f"{name}_{i}")
        else:  # a cache object or anything else the exporters would flatten their own way
            raise _Unnamed

    try:
        if isinstance(out, torch.Tensor):
            walk(out, "output")
        elif isinstance(out, Mapping):
            for k, v in out.items():
                walk(v, str(k))
        elif isinstance(out, (tuple, list)):
            for i, v in enumerate(out):
                walk(v, f"output_{i}")
        else:
            return None
    except _Unnamed:
        return None
    return names, tensors


def cache_output(out: Any, where: str = "output") -> tuple[str, str] | None:
    """(where, type name) of the first KV-cache object (transformers' ``*Cache``) in a model's output."""
    if out is None or isinstance(out, torch.Tensor):
        return None
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(out)]
    else:
        kind = type(out).__name__
        return (where, kind) if kind.endswith("Cache") else None
    for name, value in items:
        found = cache_output(value, name)
        if found is not None:
            return found
    return None


def refuse_cache_output(out: Any) -> None:
    """Refuse up front (the export itself would fail minutes later) a model that returns a KV cache."""
    found = cache_output(out)
    if found is not None:
        where, kind = found
        raise LoraExportError(
            f"cannot export a model that returns a {kind} ({where}): exporters take tensors only; "
            "make the factory return a model without a cache (use_cache=False) or a wrapper whose "
            "forward returns tensors (e.g. the logits)"
        )


# -- checking the exported shapes ----------------------------------------------------------------


def grown(args: tuple, kwargs: dict | None, specs: list[InputSpec], axes: dict[str, dict[int, str]], size=None):
    """The example inputs with each dimension named in ``axes`` ({input: {axis: name}}) resized (values
    repeated cyclically along it) to ``size(label, old)``, by default grown a little, each name by its own
    amount. Returns (args, kwargs, {input name: new tensor})."""
    first: dict[str, tuple[str, int]] = {}  # dimension name -> (proposed label, example size)
    for s in specs:
        for axis, label in s.axes.items():
            if axis in axes.get(s.name, {}):
                first.setdefault(axes[s.name][axis], (label, int(s.tensor.shape[axis])))
    if size is None:
        counts = {BATCH: 0, SEQUENCE: 0}

        def size(label: str, old: int) -> int:
            kind = BATCH if label == BATCH else SEQUENCE
            start, step = _GROWTH[kind]
            counts[kind] += 1
            return old + start + step * (counts[kind] - 1)

    new_size = {dim: size(label, old) for dim, (label, old) in first.items()}
    replaced = {}
    for s in specs:
        t = s.tensor
        for axis in s.axes:
            dim = axes.get(s.name, {}).get(axis)
            if dim is not None and t.shape[axis] != new_size[dim]:
                index = torch.arange(new_size[dim]) % t.shape[axis]
                t = t.index_select(axis, index.to(t.device))
        replaced[id(s.tensor)] = (s.name, t)
    new_args = tuple(replaced[id(a)][1] if id(a) in replaced else a for a in args)
    new_kwargs = {k: replaced[id(v)][1] if id(v) in replaced else v for k, v in (kwargs or {}).items()}
    return new_args, new_kwargs, dict(replaced.values())


def widened(args: tuple, kwargs: dict | None, specs: list[InputSpec]):
    """Trace inputs for a proposal: a proposed dimension of size 1 is repeated to 2 (exporters specialize
    sizes 0 and 1), and two lengths of one size are made different (so that an output's length says which
    input length it follows). Returns (args, kwargs, specs over the new tensors) or None when unchanged."""
    sizes: dict[str, int] = {}
    for s in specs:
        for axis, label in s.axes.items():
            if label not in sizes:
                new = max(int(s.tensor.shape[axis]), 2)
                while label != BATCH and new in {n for lb, n in sizes.items() if lb != BATCH}:
                    new += 1
                sizes[label] = new
    if all(s.tensor.shape[a] == sizes[label] for s in specs for a, label in s.axes.items()):
        return None
    axes = {s.name: dict(s.axes) for s in specs}
    new_args, new_kwargs, tensors = grown(args, kwargs, specs, axes, size=lambda label, old: sizes[label])
    return new_args, new_kwargs, [InputSpec(s.name, s.param, tensors[s.name], dict(s.axes)) for s in specs]


def outputs_agree(actual: list[np.ndarray], expected: list[torch.Tensor], rel: float = 1e-3) -> bool:
    """Loose agreement: a baked-in shape gives errors or garbage, not rounding differences."""
    if len(actual) != len(expected):
        return False
    for a, e in zip(actual, expected):
        e = e.detach().cpu().numpy()
        if a.shape != e.shape:
            return False
        if not np.issubdtype(e.dtype, np.floating):
            if not np.array_equal(a, e):
                return False
            continue
        scale = float(np.abs(e).max()) if e.size else 0.0
        if e.size and float(np.abs(a.astype(np.float64) - e).max()) > rel * scale + 1e-6:
            return False
    return True


def torch_at_grown(base: nn.Module, args: tuple, kwargs: dict | None, specs: list[InputSpec], axes: dict):
    """(ONNX feeds, torch output leaves) with the ``axes`` grown; None when torch fails there."""
    new_args, new_kwargs, tensors = grown(args, kwargs, specs, axes)
    feeds = {name: t.detach().cpu().numpy() for name, t in tensors.items()}
    try:
        with torch.no_grad():
            return feeds, output_leaves(base(*new_args, **new_kwargs))
    except Exception:  # noqa: BLE001 - the model's code fixes this size
        return None


def onnx_serves(path: Path, feeds: dict, leaves, out_names: list[str] | None) -> bool:
    """Does the exported model, run at grown dynamic dimensions, agree with the torch model there?"""
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}
        results = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
    except Exception:  # noqa: BLE001 - a dimension the export baked in fails in ONNX Runtime
        return False
    if leaves is None:
        return True  # nothing to compare against by structure; the graph ran at the new shape
    names = [o.name for o in sess.get_outputs()]
    expected = dict(zip(out_names or leaves[0], leaves[1]))
    if set(names) <= set(expected):
        return outputs_agree(results, [expected[n] for n in names])
    return outputs_agree(results, leaves[1])

"""Quantized LoRA inputs of models made by other tools: A/B fed to a quantized op as its weight inputs.

Olive's int4 LoRA models (``generate-adapter`` on onnxruntime-genai's int4 builder output, or ExtractAdapters
on MatMulNBits LoRA nodes) compute each branch as ``MatMulNBits(MatMulNBits(x, A_q), B_q)``, where A_q and
B_q are graph inputs (``<module>.lora_A.MatMul.weight_Q4`` / ``.weight_scales``, or ``.quant.weight`` /
``.quant.scale`` / ``.quant.zero_point``). Which inputs carry the weight, its fixed (N, K) shape and how to
quantize into them is the op's layout's knowledge (``OpLayout.input_weight`` / ``quantize_input_weight``:
the int4 plugin quantizes bit for bit as ONNX Runtime's MatMulNBitsQuantizer). Here:

- A's op holds A (r, in), B's op holds B (out, r), the rank fixed by their attributes (a lower-rank adapter
  is padded with zeros, which quantize to exactly zero); the branch's in-graph scale is read as for float
  slots and B′ = B·(s_adapter/s_graph) before quantizing;
- quantizing is lossy: ``convert`` needs ``--requantize`` to write a covered slot, and reports per slot the
  error of the branch's effective ΔW = s_graph·deq(B′)·deq(A′) against the float s·B·A;
- slots the adapter does not cover always get zeros (exact: the branch adds 0), since such models' rank-0
  defaults do not fit the ops' fixed shapes (ONNX Runtime 1.31 refuses them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lora_export.errors import AdapterError, ModelError, ShapeError

from ..ops.layouts import InputWeight, get_layout
from .foreign import (
    ForeignSlot,
    added_to_base,
    checked_scale,
    lora_input_names,
    read_foreign_slots,
    scaled_path,
    used_input,
)

_QUANT_NAME = re.compile(r"^(?P<module>.+?)\.lora_(?P<ab>[AB])(?:[./_]|$)")


@dataclass
class QuantSlot(ForeignSlot):
    """A module's LoRA A/B as the weight inputs of two quantized ops (each input index → its graph input)."""

    a_inputs: dict[int, str] = field(default_factory=dict)
    b_inputs: dict[int, str] = field(default_factory=dict)
    scheme: str = ""  # as the layout describes A's and B's storage

    quantized = True


def read_model_slots(model: ir.Model) -> dict[str, ForeignSlot]:
    """Every LoRA slot of a model made by another tool: quantized ones (this module) and float ones."""
    quant = read_quant_slots(model)
    names = {n for s in quant.values() for n in (*s.a_inputs.values(), *s.b_inputs.values())}
    slots = read_foreign_slots(model, skip=names)
    both = sorted(set(slots) & set(quant))
    if both:
        raise ModelError(f"module {both[0]!r} has both float and quantized LoRA inputs: which one to fill is ambiguous")
    return {**slots, **quant}


def _inputs(model: ir.Model) -> dict[str, ir.Value]:
    declared: dict[str, list[ir.Value]] = {}
    for v in model.graph.inputs:
        declared.setdefault(v.name, []).append(v)
    return {name: used_input(values) for name, values in declared.items()}


def _weight_user(value: ir.Value) -> tuple[ir.Node, int, InputWeight] | None:
    """(node, input index, its layout's InputWeight) when a quantized op reads ``value`` as part of its weight."""
    uses = list(value.uses())
    if not uses:
        return None
    layout = get_layout(uses[0].node)
    spec = layout.input_weight(uses[0].node) if layout is not None else None
    if spec is None:
        return None
    node, idx = uses[0].node, uses[0].idx
    if len(uses) != 1 or value.is_graph_output():
        raise ModelError(f"LoRA input {value.name!r} is read {len(uses)} times; a quantized LoRA weight is read once")
    if idx not in spec.inputs:
        raise ModelError(f"LoRA input {value.name!r} is input {idx} of {node.op_type} {node.name!r}, not its weight")
    return node, idx, spec


def read_quant_slots(model: ir.Model) -> dict[str, QuantSlot]:
    """The slots whose LoRA inputs a quantized op reads as its weight, by module path (one-line refusals)."""
    inputs = _inputs(model)
    parts: dict[tuple[str, str], tuple[ir.Node, InputWeight, dict[int, str]]] = {}
    for name in lora_input_names(model):
        found = _weight_user(inputs[name]) if name in inputs else None
        if found is None:
            continue  # a float input (or a constant): foreign_slots reads or refuses it
        node, idx, spec = found
        m = _QUANT_NAME.match(name)
        if m is None:
            raise ModelError(f"quantized LoRA input {name!r} is not named <module>.lora_A|B...: its module is unknown")
        key = (m["module"], m["ab"])
        entry = parts.setdefault(key, (node, spec, {}))
        if entry[0] is not node:
            raise ModelError(
                f"module {key[0]!r} has lora_{key[1]} inputs read by two ops ({entry[0].name!r}, {node.name!r})"
            )
        entry[2][idx] = name
    for (module, ab), (node, spec, names) in parts.items():
        if set(names) != set(spec.inputs):
            missing = sorted(set(spec.inputs) - set(names))
            raise ModelError(
                f"module {module!r}: {node.op_type} {node.name!r} takes lora_{ab} from inputs {list(spec.inputs)} but "
                f"{missing} are not LoRA graph inputs; an adapter file cannot replace them"
            )
    slots = {}
    for module in sorted({m for m, _ in parts}):
        if (module, "A") not in parts or (module, "B") not in parts:
            have = "A" if (module, "A") in parts else "B"
            raise ModelError(f"module {module!r} has a quantized lora_{have} but no lora_{'B' if have == 'A' else 'A'}")
        slots[module] = _read_slot(module, parts[(module, "A")], parts[(module, "B")])
    return slots


def _read_slot(module: str, a: tuple, b: tuple) -> QuantSlot:
    what = f"LoRA slot {module!r}"
    (a_node, a_spec, a_names), (b_node, b_spec, b_names) = a, b
    r_a, in_f = a_spec.shape  # A's op computes x·Aᵀ: N = r, K = in
    out_f, r_b = b_spec.shape  # B's op: N = out, K = r
    if r_a != r_b:
        raise ModelError(f"{what}: lora_A and lora_B disagree on the rank ({r_a} vs {r_b})")
    if a_spec.dtype != b_spec.dtype:
        raise ModelError(f"{what}: lora_A/lora_B apply to different dtypes ({a_spec.dtype}, {b_spec.dtype})")
    x = a_node.inputs[0]
    nxt, factor_ab, fed = scaled_path(a_node.outputs[0], what)
    if nxt is not b_node or b_node.inputs[0] is not fed:
        raise ModelError(f"{what}: lora_A's product is not the input of lora_B's {b_node.op_type} (unknown layout)")
    scale = checked_scale(factor_ab * added_to_base(b_node.outputs[0], x, what), what)
    return QuantSlot(
        module=module,
        a=a_names[min(a_names)],
        b=b_names[min(b_names)],
        a_transposed=False,
        b_transposed=False,
        in_features=in_f,
        out_features=out_f,
        rank=r_a,
        rank_dims=[],
        dtype=a_spec.dtype,
        graph_scale=scale,
        zero_default=False,
        a_inputs=dict(sorted(a_names.items())),
        b_inputs=dict(sorted(b_names.items())),
        scheme=f"{a_node.op_type} {a_spec.scheme}" + ("" if b_spec.scheme == a_spec.scheme else f" / {b_spec.scheme}"),
    )


class QuantWriter:
    """``write_quantized`` for ``foreign_tensors``: quantizes A′/B′ with the ops' layouts, keeping each covered
    slot's error in ``report`` (module → scheme, max abs and relative Frobenius error of ΔW)."""

    def __init__(self, model: ir.Model) -> None:
        self._inputs = _inputs(model)
        self.report: dict[str, dict] = {}

    def __call__(self, slot: ForeignSlot, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        assert isinstance(slot, QuantSlot)
        with np.errstate(over="ignore", invalid="ignore"):
            a32, b32 = a.T.astype(np.float32), b.T.astype(np.float32)  # canonical A (r, in), B (out, r)
        if not (np.isfinite(a32).all() and np.isfinite(b32).all()):
            raise AdapterError(f"LoRA slot {slot.module!r}: A or B·(s/s_graph) overflows float32")
        tensors, deq = {}, []
        for names, w in ((slot.a_inputs, a32), (slot.b_inputs, b32)):
            node = next(iter(self._inputs[names[min(names)]].uses())).node
            parts, applied = get_layout(node).quantize_input_weight(node, w)
            tensors.update({names[i]: _fit(arr, self._inputs[names[i]]) for i, arr in parts.items()})
            deq.append(applied.astype(np.float64))
        if a.any() and b.any():
            want = slot.graph_scale * (b.T @ a.T)  # s·B·A, float64 (out, in)
            err = slot.graph_scale * (deq[1] @ deq[0]) - want
            norm = float(np.linalg.norm(want))
            self.report[slot.module] = {
                "scheme": slot.scheme,
                "max_abs_error": float(np.abs(err).max()),
                "rel_frobenius_error": float(np.linalg.norm(err) / norm) if norm else 0.0,
            }
        return tensors


def _fit(arr: np.ndarray, value: ir.Value) -> np.ndarray:
    """``arr`` in the shape the graph input declares (a flattened scales/zero-points input is reshaped)."""
    if value.shape is None:
        return arr
    fixed = [d if isinstance(d, int) else None for d in value.shape]
    if len(fixed) == arr.ndim and all(f is None or f == s for f, s in zip(fixed, arr.shape)):
        return arr
    known = int(np.prod([f for f in fixed if f is not None]))
    if fixed.count(None) <= 1 and known and arr.size % known == 0:
        shape = [arr.size // known if f is None else f for f in fixed]
        if int(np.prod(shape)) == arr.size:
            return arr.reshape(shape)
    raise ShapeError(
        f"{value.name!r}: the model declares shape {list(value.shape)}, the quantized tensor is {arr.shape}"
    )

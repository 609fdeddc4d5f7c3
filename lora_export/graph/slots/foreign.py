"""LoRA inputs of models made by other tools, read from the graph (such models carry no slot manifest).

Olive (``capture-onnx-graph --adapter_path`` then ``generate-adapter``, i.e. its ``ExtractAdapters`` pass) and
onnxruntime-genai's builder (``--extra_options adapter_path=...``) name a module's LoRA weights
``<module>.lora_A.weight``, ``<module>.lora_A.default.weight`` or ``<module>.lora_A.MatMul.weight`` (same for
``lora_B``), and the genai builder calls a layer's attention ``attn`` where the PyTorch model says
``self_attn``. Nothing else about them is written down, so it is read from how the graph consumes them:

- layout: ``MatMul(x, A)`` takes A as (in, r), ``MatMul(x, Transpose(A))`` as (r, in); B likewise (r, out) or
  (out, r); anything else is refused;
- scale: the constant scalars that multiply (or divide) the branch between A's MatMul and the ``Add`` with
  the base output. An exporter that keeps PEFT's ``Mul`` by α/r bakes the first adapter's scale into the
  graph; an adapter with another scale is written as B·(s_adapter/s_graph) (in float64, rounded once), so
  the model computes s_adapter·BA. A factor that is not a constant is refused;
- rank: symbolic (any rank fits) or fixed (a lower-rank adapter is padded with zeros: exact);
- no adapter: inputs whose default is rank 0 or zeros are left out of the file for modules the adapter
  does not cover; otherwise zeros are written for them (the branch then adds exactly 0).

LoRA inputs fed to a quantized op (Olive's int4 LoRA: ``MatMulNBits`` B/scales as inputs) are read by
``foreign_quant``, which passes their names here as ``skip`` and writes their tensors (``write_quantized``).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from lora_export.core.adapter import Adapter
from lora_export.errors import AdapterError, ModelError, ShapeError, TargetError, some

from ..match.module_paths import best_unique
from .tensors import check_finite_tensors

# <module>.lora_A[.<adapter or op name>].weight. Other names with a lora_A/lora_B segment (int4 adapter tensors:
# Olive's ".quant.weight"/".quant.scale", the genai builder's "weight_Q4"/"weight_scales") are foreign_quant's
# when a quantized op reads them, else refused by name.
_LORA_NAME = re.compile(r"^(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<seg>[A-Za-z0-9_]+))?\.weight$")
_LORA_SEGMENT = re.compile(r"(^|[./])lora_[AB]([./]|$)")
# Module names exporters write differently from the PyTorch model (onnxruntime-genai's builder: ``attn``).
_SEGMENT_ALIASES = {"attn": "self_attn"}


@dataclass
class ForeignSlot:
    """One module's LoRA inputs in a model made elsewhere, as the graph consumes them."""

    module: str  # the module path as the graph's names spell it
    a: str
    b: str
    a_transposed: bool  # A is stored (r, in) rather than (in, r)
    b_transposed: bool  # B is stored (out, r) rather than (r, out)
    in_features: int
    out_features: int
    rank: int | None  # fixed by the model, or None when the rank dimension is symbolic
    rank_dims: list[str]  # the symbolic rank dimensions' names (ORT holds equal names to one size per run)
    dtype: str
    graph_scale: float  # the constant factor the graph applies to the branch (1.0: none)
    zero_default: bool  # both inputs default to rank 0 or zeros: leaving them out is "no adapter"

    quantized: ClassVar[bool] = False  # foreign_quant's QuantSlot: A/B are a quantized op's weight inputs


def lora_input_names(model: ir.Model) -> list[str]:
    """Names of graph inputs and initializers that look like PEFT/Olive/genai LoRA weights."""
    names = [v.name for v in model.graph.inputs] + list(model.graph.initializers)
    return sorted({n for n in names if n and _LORA_SEGMENT.search(n)})


def read_foreign_slots(model: ir.Model, skip: Collection[str] = ()) -> dict[str, ForeignSlot]:
    """The float LoRA slots of a model without a lora_export manifest, by module path (one-line refusal when
    any LoRA input is consumed in a way this reader cannot prove exact); names in ``skip`` are read elsewhere."""
    graph = model.graph
    inputs: dict[str, list[ir.Value]] = {}
    for v in graph.inputs:
        inputs.setdefault(v.name, []).append(v)
    pairs: dict[str, dict[str, str]] = {}
    for name in lora_input_names(model):
        if name in skip:
            continue
        if name not in inputs:
            raise ModelError(
                f"LoRA weight {name!r} is a constant of the graph, not an input: an adapter file cannot replace it "
                "(make the LoRA weights inputs, e.g. olive generate-adapter, or use lora-export inject on the base)"
            )
        m = _LORA_NAME.match(name)
        if m is None or m["seg"] == "quant":
            raise ModelError(
                f"LoRA input {name!r} is neither a float weight named <module>.lora_A|B[.<name>].weight nor read "
                "by a quantized op with a registered layout (int4 MatMulNBits needs the lora_export int4 plugin)"
            )
        slot = pairs.setdefault(m["module"], {})
        if m["ab"] in slot:
            raise ModelError(
                f"module {m['module']!r} has two lora_{m['ab']} inputs ({slot[m['ab']]!r}, {name!r}): "
                "which one an adapter fills is ambiguous"
            )
        slot[m["ab"]] = name
    slots = {}
    for module, names in sorted(pairs.items()):
        if set(names) != {"A", "B"}:
            have = next(iter(names))
            raise ModelError(f"module {module!r} has a lora_{have} input but no lora_{'B' if have == 'A' else 'A'}")
        slots[module] = _read_slot(module, used_input(inputs[names["A"]]), used_input(inputs[names["B"]]))
    return slots


def used_input(values: list[ir.Value]) -> ir.Value:
    # ExtractAdapters lists each LoRA input twice (once bare, once with its default): the one nodes read counts.
    used = [v for v in values if v.uses()] or values[:1]
    if len(used) > 1:
        raise ModelError(f"graph input {values[0].name!r} is declared twice and both are read")
    return used[0]


def _only_consumer(v: ir.Value, what: str) -> ir.Node:
    users = {id(u.node): u.node for u in v.uses()}
    if len(users) != 1 or v.is_graph_output():
        raise ModelError(f"{what}: {v.name!r} is read by {len(users)} nodes; a LoRA branch reads it once")
    return next(iter(users.values()))


def _fed(v: ir.Value, what: str) -> tuple[ir.Node, ir.Value, bool]:
    """(consumer, the value it reads, transposed) for a LoRA input read directly or through a 2-D Transpose."""
    node = _only_consumer(v, what)
    if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            raise ModelError(f"{what}: {v.name!r} is transposed with perm {list(perm.as_ints())}")
        return _only_consumer(node.outputs[0], what), node.outputs[0], True
    return node, v, False


def _is_matmul_weight(node: ir.Node, value: ir.Value) -> bool:
    return node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.inputs[1] is value


def _constant(v: ir.Value | None) -> float | None:
    """A scalar constant (a non-input initializer or a Constant node's value), else None."""
    if v is None or v.is_graph_input():
        return None
    tensor = v.const_value
    producer = v.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        tensor = producer.attributes["value"].as_tensor()
    if tensor is None:
        return None
    arr = tensor.numpy()
    return float(arr.reshape(-1)[0]) if arr.size == 1 and arr.dtype.kind == "f" else None


def scaled_path(v: ir.Value, what: str) -> tuple[ir.Node, float, ir.Value]:
    """Follow ``v`` through Mul/Div by scalar constants: (the next node, the product of the factors, the value
    that node reads)."""
    factor = 1.0
    while True:
        node = _only_consumer(v, what)
        if node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx"):
            return node, factor, v
        other = node.inputs[1] if node.inputs[0] is v else node.inputs[0]
        c = _constant(other)
        if c is None or (node.op_type == "Div" and node.inputs[0] is not v):
            raise ModelError(f"{what}: the branch is multiplied by {other.name!r}, which is not a constant scalar")
        factor = factor * c if node.op_type == "Mul" else factor / c
        v = node.outputs[0]


def _read_slot(module: str, a: ir.Value, b: ir.Value) -> ForeignSlot:
    what = f"LoRA slot {module!r}"
    a_node, a_fed, a_t = _fed(a, what)
    if not _is_matmul_weight(a_node, a_fed):
        raise ModelError(f"{what}: lora_A is read by {a_node.op_type}, not as a MatMul weight (unknown layout)")
    x = a_node.inputs[0]
    b_node, factor_ab, _ = scaled_path(a_node.outputs[0], what)
    b_user, b_fed, b_t = _fed(b, what)
    if b_user is not b_node or not _is_matmul_weight(b_node, b_fed):
        raise ModelError(f"{what}: lora_A's product does not go into a MatMul with lora_B (unknown layout)")
    factor_out = added_to_base(b_node.outputs[0], x, what)
    shape_a, shape_b = _dims(a), _dims(b)
    if shape_a is None or shape_b is None:
        raise ModelError(f"{what}: lora_A/lora_B are not 2-D inputs with a known shape")
    (in_f, r_a) = shape_a[::-1] if a_t else shape_a
    (r_b, out_f) = shape_b[::-1] if b_t else shape_b
    rank_dims = sorted({str(d) for d in (_rank_dim(a, a_t, 1), _rank_dim(b, b_t, 0)) if d is not None})
    if not isinstance(in_f, int) or not isinstance(out_f, int):
        raise ModelError(f"{what}: the input and output sizes of lora_A/lora_B are not fixed")
    if isinstance(r_a, int) != isinstance(r_b, int) or (isinstance(r_a, int) and r_a != r_b):
        raise ModelError(f"{what}: lora_A and lora_B disagree on the rank ({r_a} vs {r_b})")
    dtype = a.dtype.numpy() if a.dtype is not None else None
    if dtype is None or b.dtype != a.dtype or np.dtype(dtype).kind != "f":
        raise ModelError(f"{what}: lora_A/lora_B are not of one floating-point dtype")
    scale = checked_scale(factor_ab * factor_out, what)
    return ForeignSlot(
        module=module,
        a=a.name,
        b=b.name,
        a_transposed=a_t,
        b_transposed=b_t,
        in_features=in_f,
        out_features=out_f,
        rank=r_a if isinstance(r_a, int) else None,
        rank_dims=rank_dims,
        dtype=str(np.dtype(dtype)),
        graph_scale=scale,
        zero_default=_zero(a) and _zero(b),
    )


def added_to_base(d: ir.Value, x: ir.Value, what: str) -> float:
    """The constant factor between the branch output ``d`` and its Add to an op reading ``x`` (the base)."""
    add, factor, branch = scaled_path(d, what)
    if add.op_type != "Add" or len(add.inputs) != 2:
        raise ModelError(f"{what}: the LoRA branch ends in {add.op_type}, not an Add to the base output")
    base = add.inputs[1] if add.inputs[0] is branch else add.inputs[0]
    if base is None or not _reads(base.producer(), x):
        raise ModelError(f"{what}: the branch is not added to an op reading the same input as lora_A")
    return factor


def checked_scale(scale: float, what: str) -> float:
    if not np.isfinite(scale) or scale == 0:
        raise ModelError(f"{what}: the graph multiplies the branch by {scale}; no adapter can be written for it")
    return scale


def _reads(node: ir.Node | None, x: ir.Value) -> bool:
    """Whether ``node`` (or, for a bias Add, the node under it) reads ``x``."""
    if node is None:
        return False
    if any(i is x for i in node.inputs):
        return True
    return node.op_type == "Add" and any(_reads(i.producer(), x) for i in node.inputs if i is not None)


def _dims(v: ir.Value) -> tuple | None:
    if v.shape is None or len(v.shape) != 2:
        return None
    return tuple(d if isinstance(d, int) else None for d in v.shape)


def _rank_dim(v: ir.Value, transposed: bool, index: int) -> str | None:
    d = v.shape[1 - index if transposed else index]
    return d.value if isinstance(d, ir.SymbolicDim) and d.value else None


def _zero(v: ir.Value) -> bool:
    tensor = v.const_value
    if tensor is None:
        return False
    arr = tensor.numpy()
    return arr.size == 0 or not np.any(arr)


def _normalized(path: str) -> str:
    return ".".join(_SEGMENT_ALIASES.get(s, s) for s in path.split("."))


def match_targets(adapter: Adapter, slots: dict[str, ForeignSlot]) -> dict[str, ForeignSlot]:
    """Adapter target → its slot, by module path (dotted suffix, ``attn`` read as ``self_attn``); every target
    must find exactly one slot and no slot two targets."""
    keyed: dict[str, list[ForeignSlot]] = {}
    for slot in slots.values():
        keyed.setdefault(_normalized(slot.module), []).append(slot)
    clash = sorted(k for k, v in keyed.items() if len(v) > 1)
    if clash:
        raise ModelError(f"two LoRA slots map to module {clash[0]!r} ({', '.join(s.module for s in keyed[clash[0]])})")
    chosen: dict[str, ForeignSlot] = {}
    missing, owners = [], {}
    for t in adapter:
        key, found, why = best_unique(_normalized(t.name), keyed)
        if key is None:
            missing.append(f"{t.name} ({why})")
            continue
        other = owners.setdefault(key, t.name)
        if other != t.name:
            raise TargetError(f"targets {other} and {t.name} both map to the model's LoRA slot {found[0].module!r}")
        chosen[t.name] = found[0]
    if missing:
        shown = ", ".join(missing[:4]) + (f", ... ({len(missing) - 4} more)" if len(missing) > 4 else "")
        raise TargetError(f"adapter {adapter.name!r}: targets with no LoRA input in the model: {shown}")
    return chosen


QuantWriter = Callable[[ForeignSlot, np.ndarray, np.ndarray], dict[str, np.ndarray]]


def foreign_tensors(
    adapter: Adapter, slots: dict[str, ForeignSlot], write_quantized: QuantWriter | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors that make the model compute ``adapter`` (named, laid out and scaled as the model takes
    them) and a summary; zeros for slots the adapter leaves out whose defaults are not already zero.
    ``write_quantized(slot, a (in, r), b (r, out))`` stores a quantized slot's A′/B′ (float64, B′ scaled)."""
    if adapter.extra:
        raise AdapterError(
            f"adapter {adapter.name!r}: full replacement tensors ({some(sorted(adapter.extra))}) "
            "cannot be swapped at run time; use merge"
        )
    chosen = match_targets(adapter, slots)
    misfits = [f"{t.name} ({why})" for t in adapter if (why := _misfit(chosen[t.name], t))]
    if misfits:
        raise ShapeError(f"adapter {adapter.name!r} does not fit the model's LoRA inputs: {'; '.join(misfits)}")
    by_module = {chosen[t.name].module: t for t in adapter}
    ranks = _ranks(slots, {m: t.rank for m, t in by_module.items()})
    tensors, zeroed = {}, []
    for module, slot in sorted(slots.items()):
        rank = ranks.get(module)
        if rank is None:  # not covered and free to keep its default: "no adapter"
            continue
        a = np.zeros((slot.in_features, rank), np.float64)
        b = np.zeros((rank, slot.out_features), np.float64)
        t = by_module.get(module)
        if t is None:
            zeroed.append(module)
        else:
            # Zero columns of A / rows of B past the adapter's rank add exactly nothing.
            a[:, : t.rank] = np.asarray(t.A, np.float64).T
            # The graph multiplies by its own constant: B carries s_adapter/s_graph so the product is s_adapter·BA.
            b[: t.rank] = np.asarray(t.B, np.float64).T * (float(t.scale) / slot.graph_scale)
        if slot.quantized:
            if write_quantized is None:
                raise ModelError(f"LoRA slot {module!r} takes quantized tensors and no writer for them was given")
            tensors.update(write_quantized(slot, a, b))
        else:
            tensors.update(_stored(slot, a, b))
    covered = set(by_module)
    check_finite_tensors(tensors, f"adapter {adapter.name!r}: LoRA tensors scaled and cast")
    summary = {
        "slots_filled": sorted(covered),
        "slots_default": sorted(set(slots) - covered - set(zeroed)),
        "slots_zeroed": sorted(zeroed),
        "graph_scales": {s.module: s.graph_scale for s in slots.values() if s.graph_scale != 1.0},
    }
    return tensors, summary


def _ranks(slots: dict[str, ForeignSlot], wanted: dict[str, int]) -> dict[str, int]:
    """The rank written per slot. Slots sharing a symbolic rank name (Olive names them all ``lora_r``) must get
    one rank in a run: the largest any of them needs, the others padded with zeros. Slots left out keep their
    defaults only when no written slot shares their rank name and the defaults are "no adapter"."""
    groups: list[set[str]] = []
    for module, slot in slots.items():
        linked = [g for g in groups if any(set(slots[m].rank_dims) & set(slot.rank_dims) for m in g)]
        merged = {module}.union(*linked)
        groups = [g for g in groups if g not in linked] + [merged]
    ranks: dict[str, int] = {}
    for group in groups:
        for module in group:
            slot = slots[module]
            if slot.rank is not None:
                if module in wanted or not slot.zero_default:
                    ranks[module] = slot.rank
                continue
            needed = [wanted[m] for m in group if m in wanted]
            if needed or not slot.zero_default:
                ranks[module] = max(needed, default=0)
    return ranks


def _misfit(slot: ForeignSlot, t) -> str | None:
    if t.kind != "linear" or t.is_dora:
        return f"{'DoRA' if t.is_dora else t.kind} LoRA; the model's inputs take plain linear LoRA"
    if (t.in_features, t.out_features) != (slot.in_features, slot.out_features):
        return f"adapter is {t.in_features}→{t.out_features}, the model's slot {slot.in_features}→{slot.out_features}"
    if slot.rank is not None and t.rank > slot.rank:
        return f"rank {t.rank} exceeds the model's fixed rank {slot.rank}"
    return None


def _stored(slot: ForeignSlot, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    dt = np.dtype(slot.dtype)
    a = a.T if slot.a_transposed else a
    b = b.T if slot.b_transposed else b
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused by the finiteness check
        return {slot.a: np.ascontiguousarray(a).astype(dt), slot.b: np.ascontiguousarray(b).astype(dt)}


def slots_fingerprint(slots: dict[str, ForeignSlot]) -> int:
    """A 31-bit id of the slots read from the graph (the .onnx_adapter model version)."""
    text = json.dumps([asdict(s) for _, s in sorted(slots.items())], sort_keys=True)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF

"""Per-row adapters: LoRA slot inputs that hold a pool of adapters, and an input picking each row's adapter.

``make_per_row`` turns a model that ``inject_adapters`` gave single-adapter slots into a per-row model. Each
slot input keeps its name but gains a leading pool axis: A′ (in, r) → (P, in, r), B′ (r, out) → (P, r, out),
DoRA's g (out,) → (P, out). A new int64 input ``lora_adapter_ids`` (n,) picks, per batch row, the pool entry
whose tensors apply to it: ``Gather(pool, ids)`` gives each row its own A′ and B′, and the branch's MatMuls
broadcast over the batch axis, so row i computes (x_i·A′_ids[i])·B′_ids[i]. Entry 0 is reserved for "no
adapter" and holds zeros (g: ones), so such rows add exact zeros. ids of shape (1,) apply one entry to
every row. The defaults (one entry, rank 0, ids = [0]) give the base model.

Why this form: its cost does not depend on the pool size (one Gather of batch·in·r values per input, then
the same batched MatMuls as one adapter), unlike a masked concatenation of every adapter (cost ∝ Σ ranks).
Ranks and target sets may differ across the pool: each slot's pool is zero-padded to its largest rank (zero
columns of A′ meet zero rows of B′: exact), and an adapter without a target has zeros there.

The pass rewrites only what reads the slot inputs: a packed projection's concatenated A_cat/B_cat pair
(``packed_cat``) pools like any pair (its rank: the largest Σr in the pool); Pad and Concat of the per-slot
packed branches (``packed_cat=False``) get one more leading axis; every path must end in a MatMul that takes a
per-row activation (rank ≥ 3: batch first), or DoRA's Mul. Anything else (a fused Attention fed a computed
weight, conv, embedding, a 2-D activation) is refused in one line: it cannot be per-row exact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from lora_export.errors import ModelError

from ..model.slot_manifest import Slot, SlotManifest
from ..ops.branches import _const
from .activation_ranks import ActivationRanks

PER_ROW_KEY = "lora_export.per_row"
IDS_INPUT = "lora_adapter_ids"
NO_ADAPTER = 0  # the reserved pool entry: zeros (DoRA g: ones), the base model
POOL_DIM = "lora_pool"
POOL_FILE = "pool.safetensors"
POOL_ORDER_KEY = "lora_export.pool"  # pool.safetensors metadata: JSON list, adapter of entry i+1 at i


def pool_metadata(order: Sequence[str]) -> dict[str, str]:
    """pool.safetensors' metadata: which adapter each entry holds (one key: writers order maps freely)."""
    return {POOL_ORDER_KEY: json.dumps(list(order))}


def per_row_meta(metadata: Mapping[str, str]) -> dict | None:
    """The per-row description in a model's metadata (None: single-adapter slots); corrupt: ModelError."""
    text = metadata.get(PER_ROW_KEY)
    if text is None:
        return None
    try:
        meta = json.loads(text)
        ok = isinstance(meta, dict) and isinstance(meta.get("ids"), str) and meta.get("none") == NO_ADAPTER
    except ValueError:
        ok = False
    if not ok:
        raise ModelError(f"corrupt {PER_ROW_KEY} metadata")
    return meta


def make_per_row(model: ir.Model, manifest: SlotManifest) -> None:
    """Give the injected ``model``'s slots a pool axis and the ``lora_adapter_ids`` input (in place)."""
    if manifest.vera is not None:
        raise ModelError("--per-row does not take VeRA slots (their projections are shared); inject LoRA adapters")
    for slot in manifest.slots.values():
        if slot.kind != "linear":
            raise ModelError(f"--per-row: {slot.module} is a {slot.kind} slot; per-row adapters need linear layers")
    graph = model.graph
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    if IDS_INPUT in names:
        raise ModelError(f"the model already has a value named {IDS_INPUT!r}")
    ids = ir.Value(name=IDS_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["lora_rows"]))
    ids.const_value = ir.tensor(np.array([NO_ADAPTER], dtype=np.int64), name=IDS_INPUT)
    graph.inputs.append(ids)
    graph.register_initializer(ids)
    inputs = {v.name: v for v in graph.inputs}
    first = next(iter(graph), None)
    ranks = ActivationRanks(model)
    for name, slot in sorted(manifest.input_names().items()):
        old = inputs[name]
        nodes, gathered = _pool_input(graph, old, slot, ids)
        if first is not None:
            graph.insert_before(first, nodes)
        else:
            graph.extend(nodes)
        _lift_uses(graph, old, gathered, name, ranks, dora=name == slot.dora)
    model.metadata_props[PER_ROW_KEY] = json.dumps(
        {"version": 1, "ids": IDS_INPUT, "none": NO_ADAPTER}, sort_keys=True, separators=(",", ":")
    )


def _pool_input(graph: ir.Graph, old: ir.Value, slot: Slot, ids: ir.Value) -> tuple[list[ir.Node], ir.Value]:
    """Replace graph input ``old`` by its pool (same name, leading pool axis); return Gather(pool, ids)."""
    name = old.name
    default = old.const_value.numpy()
    dims = list(old.shape.dims) if old.shape is not None else [None] * default.ndim
    graph.inputs.remove(old)
    graph.initializers.pop(name)
    old.name = f"{name}/single"
    pool = ir.Value(name=name, type=old.type, shape=ir.Shape([POOL_DIM, *dims]))
    pool.const_value = ir.tensor(default[None], dtype=old.dtype, name=name)
    graph.inputs.append(pool)
    graph.register_initializer(pool)
    gather = ir.node("Gather", [pool, ids], attributes={"axis": 0}, name=f"{name}/per_row")
    gather.outputs[0].name = f"{name}/per_row"
    nodes = [gather]
    out = gather.outputs[0]
    if name == slot.dora:  # g (n, out) → (n, 1, out): it scales y (n, seq, out) per row
        axes = _const(graph, "lora_per_row.axis1", np.array([1], dtype=np.int64))
        opset = graph.opset_imports.get("", 0)
        if opset >= 13:
            unsq = ir.node("Unsqueeze", [out, axes], name=f"{name}/per_row_unsqueeze")
        else:
            unsq = ir.node("Unsqueeze", [out], attributes={"axes": [1]}, name=f"{name}/per_row_unsqueeze")
        unsq.outputs[0].name = f"{name}/per_row_rows"
        nodes.append(unsq)
        out = unsq.outputs[0]
    return nodes, out


def _lift_uses(graph: ir.Graph, old: ir.Value, new: ir.Value, name: str, ranks, *, dora: bool) -> None:
    """Point ``old``'s readers at the per-row ``new``, lifting Pad/Concat by one axis; refuse other readers."""
    uses = [(u.node, u.idx) for u in old.uses()]
    for node, idx in uses:
        node.replace_input_with(idx, new)
    _check_readers(graph, new, name, ranks, dora, set())


def _check_readers(graph: ir.Graph, value: ir.Value, name: str, ranks, dora: bool, seen: set[int]) -> None:
    for use in list(value.uses()):
        node, idx = use.node, use.idx
        what = f"{node.op_type} {node.name!r}"
        if node.op_type == "MatMul" and idx == 1:
            x = node.inputs[0]
            if not _per_row_value(x, ranks):
                raise ModelError(
                    f"--per-row: {name} feeds {what}, whose activation {x.name!r} is not known to be batch-first "
                    "with rank >= 3; per-row adapters need (batch, ..., features) activations"
                )
            continue
        if dora and node.op_type == "Mul":
            continue
        if id(node) in seen:
            continue
        if node.op_type == "Pad" and idx == 0:
            _lift_pad(graph, node)
        elif node.op_type == "Concat" and idx >= 0:
            axis = node.attributes["axis"].as_int()
            if axis >= 0:  # a per-row tensor has one more leading axis
                node.attributes["axis"] = ir.AttrInt64("axis", axis + 1)
        else:
            raise ModelError(_refusal(name, node))
        seen.add(id(node))
        _check_readers(graph, node.outputs[0], name, ranks, dora, seen)


def _refusal(name: str, node: ir.Node) -> str:
    """Why ``node`` cannot read a per-row slot tensor, naming the op that ends up with it: a fused op fed a
    weight computed from the slot (e.g. ORT's Attention fed W + A′·B′) takes one weight for the whole batch."""
    fused = _weight_reader(node)
    if fused is None:
        what = f"{node.op_type} {node.name!r}"
        return (
            f"--per-row: {name} feeds {what}, which cannot take a different adapter per row; "
            "inject without --per-row, or merge"
        )
    return (
        f"--per-row: {name} becomes part of the weight of {fused.op_type} {fused.name!r}, one weight for the whole "
        "batch, so its rows cannot take different adapters; inject without --per-row (one adapter per run), "
        "merge, or keep these projections as separate MatMuls (for ONNX Runtime's attention fusion: "
        "MultiHeadAttention)"
    )


def _weight_reader(node: ir.Node, depth: int = 0) -> ir.Node | None:
    """The op that reads, as a weight (not input 0), what ``node`` computes from a slot tensor, following
    MatMul/Add/Cast/Transpose; None when there is no such op."""
    if depth > 6:
        return None
    for out in node.outputs:
        for use in out.uses():
            reader = use.node
            if reader.op_type in ("MatMul", "Add", "Cast", "Transpose", "Reshape") and reader.domain in ("", "ai.onnx"):
                found = _weight_reader(reader, depth + 1)
                if found is not None:
                    return found
            elif use.idx > 0:
                return reader
    return None


def _lift_pad(graph: ir.Graph, node: ir.Node) -> None:
    """Pad pads [b1..bk, e1..ek] → [0, b1..bk, 0, e1..ek]; with ``axes`` (negative here) nothing changes."""
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = node.inputs[3].const_value
        if axes is None or (axes.numpy() >= 0).any():
            raise ModelError(f"--per-row: Pad {node.name!r} has axes that per-row tensors would shift")
        return
    pads = node.inputs[1].const_value if node.inputs[1] is not None else None
    if pads is None:
        raise ModelError(f"--per-row: Pad {node.name!r} has computed pads")
    p = pads.numpy().astype(np.int64)
    k = p.size // 2
    lifted = np.concatenate([[0], p[:k], [0], p[k:]]).astype(np.int64)
    node.replace_input_with(1, _const(graph, f"{node.name}.per_row_pads", lifted))


def _per_row_value(x: ir.Value | None, ranks) -> bool:
    """Whether ``x`` is batch-first with rank >= 3: x·A_rows (its activation was checked), or known so."""
    if x is None:
        return False
    producer = x.producer()
    if producer is not None and producer.op_type == "MatMul" and _gathered(producer.inputs[1]):
        return True
    rank = ranks.rank(x)
    return rank is not None and rank >= 3


def _gathered(value: ir.Value | None, depth: int = 0) -> bool:
    """Whether ``value`` is a per-row slot tensor (the Gather, or a Pad/Concat of such)."""
    if value is None or depth > 8:
        return False
    if value.name and value.name.endswith("/per_row"):
        return True
    producer = value.producer()
    if producer is None or producer.op_type not in ("Pad", "Concat"):
        return False
    return any(_gathered(i, depth + 1) for i in producer.inputs[:1] if producer.op_type == "Pad") or (
        producer.op_type == "Concat" and any(_gathered(i, depth + 1) for i in producer.inputs)
    )


def pool_report(model: ir.Model, path) -> dict | None:
    """For ``inspect``: the ids input and reserved entry, and the pool file beside the model (entries in
    order, each slot input's pool rank); None for a model without per-row slots."""
    from pathlib import Path

    meta = per_row_meta(model.metadata_props)
    if meta is None:
        return None
    report: dict = {"ids": meta["ids"], "none": meta["none"], "pool_file": None}
    pool = Path(path).parent / POOL_FILE
    if pool.is_file():
        from lora_export.formats.safetensors import read_safetensors

        tensors, metadata = read_safetensors(pool)
        try:
            order = json.loads(metadata.get(POOL_ORDER_KEY, "[]"))
        except ValueError:
            order = None
        report["pool_file"] = str(pool)
        report["entries"] = {str(n): i + 1 for i, n in enumerate(order)} if isinstance(order, list) else None
        report["ranks"] = {k: int(v.shape[-1]) for k, v in sorted(tensors.items()) if k.endswith(".lora_A")}
    return report


# -- pool tensors ---------------------------------------------------------------------------------------


def pool_tensors(manifest: SlotManifest, entries: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The pool inputs for ``entries`` (per adapter, its slot tensors as ``adapter_tensors`` gives them):
    entry 0 is "no adapter", entry i+1 is ``entries[i]``; ranks padded with zeros to the largest."""
    out: dict[str, np.ndarray] = {}
    for slot in _by_stem(manifest):
        ranks = [_rank(e[slot.a]) for e in entries if slot.a in e]
        r = max(ranks, default=0)
        a = np.zeros((len(entries) + 1, *slot.a_shape(r)), slot.np_dtype)
        b = np.zeros((len(entries) + 1, *slot.b_shape(r)), slot.np_dtype)
        for i, e in enumerate(entries, start=1):
            if slot.a in e:
                ri = _rank(e[slot.a])
                a[i, :, :ri] = e[slot.a]
                b[i, :ri, :] = e[slot.b]
        out[slot.a], out[slot.b] = a, b
        if slot.dora:
            g = np.ones((len(entries) + 1, slot.out_features), slot.np_dtype)
            for i, e in enumerate(entries, start=1):
                if slot.dora in e:
                    g[i] = e[slot.dora]
            out[slot.dora] = g
    return out


def _by_stem(manifest: SlotManifest) -> list[Slot]:
    """One slot per distinct A input (modules sharing inputs share a pool)."""
    return list({s.a: s for _, s in sorted(manifest.slots.items())}.values())


def _rank(a: np.ndarray) -> int:
    return int(a.shape[-1])

"""VeRA in adapter mode: inject's vector-only slots, and layer sizes from an injected model's slots.

A VeRA adapter file lacks its layers' input sizes; ``bind_to_slots`` reads them from an injected model's
slot manifest (``vera_bind`` from a graph). Bound, a VeRA adapter is plain canonical LoRA: merge and the
usual slots need nothing else.

Vector-only slots (inject, when every adapter is VeRA over the same projections): the graph holds ONE
copy of the shared projections as initializers, ``lora_export.vera_A`` = Aᵀ (max_in, r) and
``lora_export.vera_B`` = Bᵀ (r, max_out); each module gets inputs ``<module>.vera_lambda_d`` (r) and
``<module>.vera_lambda_b`` (out), from which the graph computes the usual branch factors

    A′ = Aᵀ[:in, :r] ⊙ λ_d    (in, r)        B′ = Bᵀ[:r, :out] ⊙ λ_b    (r, out)

and hands them to the op layout's ordinary ``add_branch``: y = op(x) + (x·A′)·B′. The rank is the length
of λ_d, so the defaults (λ_d of length 0, λ_b = 0) are the rank-0 base model, as for LoRA slots. The slot
manifest records the projections' key and sha256: adapters over other projections are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from lora_export.core.adapter import Adapter
from lora_export.core.vera import VeraProjection, bind
from lora_export.errors import AdapterError, ModelError, TargetError

A_NAME = "lora_export.vera_A"
B_NAME = "lora_export.vera_B"


def bind_to_slots(adapter: Adapter, slots: Mapping[str, Any]) -> Adapter:
    """``adapter`` compiled for the layer sizes an injected model's slots record (linear: (out, in))."""
    rec = adapter.vera
    if rec is None or rec.bound:
        return adapter
    sizes = {m: int(s.weight_shape[1]) for m, s in slots.items() if s.kind == "linear" and m in rec.vectors}
    return bind(adapter, sizes)


def common_projection(adapters: Sequence[Adapter]) -> VeraProjection | None:
    """The projections every adapter shares, when all are bound VeRA adapters over the same ones; else None."""
    recs = [a.vera for a in adapters]
    if not recs or any(r is None or r.projection is None for r in recs):
        return None
    first = recs[0].projection
    digest = first.digest()
    return first if all(r.projection.key == first.key and r.projection.digest() == digest for r in recs) else None


def projection_values(graph: ir.Graph, projection: VeraProjection, dtype: ir.DataType) -> tuple[ir.Value, ir.Value]:
    """The shared Aᵀ and Bᵀ initializers in ``dtype`` (one copy each, created on first use)."""
    suffix = "" if dtype == ir.DataType.FLOAT else f".{dtype.name.lower()}"
    values = []
    for name, arr in ((A_NAME + suffix, projection.A.T), (B_NAME + suffix, projection.B.T)):
        if name in graph.initializers:
            values.append(graph.initializers[name])
            continue
        if any(v.name == name for v in graph.inputs) or any(v.name == name for n in graph for v in n.outputs):
            raise ModelError(f"the model already has a value named {name!r}: cannot add VeRA projections")
        tensor = ir.tensor(np.ascontiguousarray(arr, dtype=np.float32), name=name)
        if dtype != ir.DataType.FLOAT:
            tensor = ir.tensor(
                np.ascontiguousarray(arr, dtype=np.float32).astype(dtype.numpy()), dtype=dtype, name=name
            )
        value = ir.val(name, const_value=tensor)
        graph.register_initializer(value)
        values.append(value)
    return values[0], values[1]


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name not in graph.initializers:
        graph.register_initializer(ir.val(name, const_value=ir.tensor(array, name=name)))
    return graph.initializers[name]


def branch_factors(
    graph: ir.Graph, module: str, in_features: int, out_features: int, lam_d: ir.Value, lam_b: ir.Value, shared
) -> tuple[ir.Value, ir.Value]:
    """A′ (in, r) and B′ (r, out) computed from the λ inputs and the shared projections, in the main graph
    before every other node (subgraph branches read them as outer-scope values)."""
    a_t, b_t = shared
    rank = ir.node("Shape", [lam_d], name=f"{module}/vera_rank")
    zeros = _const(graph, "lora_export.vera_starts", np.zeros(2, dtype=np.int64))
    n_in = _const(graph, f"{module}.vera_in", np.array([in_features], dtype=np.int64))
    n_out = _const(graph, f"{module}.vera_out", np.array([out_features], dtype=np.int64))
    ends_a = ir.node("Concat", [n_in, rank.outputs[0]], attributes={"axis": 0}, name=f"{module}/vera_ends_A")
    ends_b = ir.node("Concat", [rank.outputs[0], n_out], attributes={"axis": 0}, name=f"{module}/vera_ends_B")
    slice_a = ir.node("Slice", [a_t, zeros, ends_a.outputs[0]], name=f"{module}/vera_slice_A")
    slice_b = ir.node("Slice", [b_t, zeros, ends_b.outputs[0]], name=f"{module}/vera_slice_B")
    a = ir.node("Mul", [slice_a.outputs[0], lam_d], name=f"{module}/vera_A")
    b = ir.node("Mul", [slice_b.outputs[0], lam_b], name=f"{module}/vera_B")
    a.outputs[0].name = f"{module}.vera.lora_A"
    b.outputs[0].name = f"{module}.vera.lora_B"
    nodes = [rank, ends_a, ends_b, slice_a, slice_b, a, b]
    if graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0)) < 10:
        raise ModelError("VeRA slots need opset >= 10 (Slice with inputs)")
    graph.insert_before(graph.node(0), nodes)
    return a.outputs[0], b.outputs[0]


def vector_tensors(adapter: Adapter, manifest: Any, check: Callable[[dict, str], None]) -> dict[str, np.ndarray]:
    """λ_d and λ_b (times the target's scale, e.g. ``--scale``) per slot, cast once into the slot dtype.

    Refused, by name: a plain LoRA adapter, or VeRA over other projections (another key or values).
    """
    want = manifest.vera
    rec = adapter.vera
    if rec is None:
        raise AdapterError(
            f"adapter {adapter.name!r} is plain LoRA but this model's slots are VeRA vector slots "
            f"(projection_prng_key {want['key']}): inject it into the base model instead"
        )
    if rec.key != want["key"] or rec.r != want["r"]:
        raise AdapterError(
            f"adapter {adapter.name!r}: VeRA projection_prng_key {rec.key} (r={rec.r}) is not this model's "
            f"({want['key']}, r={want['r']}): its projections differ; inject it into the base model instead"
        )
    adapter = bind_to_slots(adapter, manifest.slots)
    if adapter.vera.projection.digest() != want["sha256"]:
        raise AdapterError(
            f"adapter {adapter.name!r}: its VeRA projections (key {rec.key}) are not the ones in this model "
            f"(sha256 {want['sha256'][:12]}): inject it into the base model instead"
        )
    missing = [t.name for t in adapter if t.name not in manifest.slots and t.name not in manifest.absent]
    if missing:
        raise TargetError(f"adapter {adapter.name!r}: targets with no VeRA slot in the model: {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    for t in adapter:
        slot = manifest.slots.get(t.name)
        if slot is None:
            continue
        vec = adapter.vera.vectors[t.name]
        if [int(vec.lambda_b.shape[0]), adapter.vera.in_features[t.name]] != list(slot.weight_shape):
            raise AdapterError(f"adapter {adapter.name!r}: {t.name} does not fit its slot (weight {slot.weight_shape})")
        with np.errstate(over="ignore", invalid="ignore"):
            lam_b = np.asarray(vec.lambda_b, dtype=np.float32) * np.float32(t.scale)
            out[slot.a] = np.asarray(vec.lambda_d, dtype=np.float32).astype(slot.np_dtype)
            out[slot.b] = lam_b.astype(slot.np_dtype)
    check(out, f"adapter {adapter.name!r}: VeRA vectors cast to the slot dtype")
    return out


def vera_slot_fields(module: str) -> dict[str, Any]:
    """The Slot fields of a vector-only slot (its input names)."""
    return {"a": f"{module}.vera_lambda_d", "b": f"{module}.vera_lambda_b", "dora": None, "vera": True}

"""The branch-free base model inside an injected model, for a twin session that serves ``adapter=None``.

``strip_branches`` undoes what ``branches.py`` added, found through the graph rather than node names:
from each slot's A′ input, the A′ op, the B′ op (and Gemm's α Mul) down to the ``Add(base, delta)`` (a
packed op's slots share one branch: their deltas joined by one Concat, or (fused Attention) their A′
through a Concat and their B′ through Pads and a Concat;
ONNX Runtime's Attention: one ``MatMul(A′, B′)`` added to its weight);
from DoRA's g input, its optional Reshape and the ``Mul(·, g)``. Those nodes go and their consumers read
the base op's output again. What stays is exactly the base computation: a Gemm bias that DoRA moved out
of the Gemm stays as its separate Add (same numbers, one more node).

``shared_initializers`` turns the model's large initializers into OrtValues over one memory (numpy views;
mmap views when the model has external data), and ``twin_proto`` the stripped model with those
initializers as external placeholders. The main session takes the OrtValues through
``SessionOptions.add_initializer``, the twin through ``add_external_initializers``: both read one copy of
the raw weights (ONNX Runtime's CPU prepacking still makes a packed copy per session).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ..errors import ModelError
from ..graph.model.slot_manifest import SlotManifest

# Initializers at least this large are shared between the sessions; smaller ones are just copied.
SHARE_MIN_BYTES = 1024
_PLACEHOLDER = "lora_export_shared_initializer.bin"


def _only_use(value: ir.Value, what: str) -> ir.Node:
    uses = list(value.uses())
    if len(uses) != 1:
        raise ModelError(f"{what}: expected one consumer of {value.name!r}, found {len(uses)}")
    return uses[0].node


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Consumers (and graph outputs) of ``old`` read ``new``; a graph output keeps its name."""
    for i, out in enumerate(graph.outputs):
        if out is old:
            name = old.name
            old.name = None
            new.name = name
            graph.outputs[i] = new
    ir.convenience.replace_all_uses_with(old, new)


def _b_side(node: ir.Node, b: ir.Value) -> list[ir.Node] | None:
    """The nodes between B′ and ``node``, which reads it: none (directly), the Pad placing B′ in a packed
    slice, or a packed group's Pads and their Concat (``graph.packed_branch``); None if ``node`` does not
    read B′."""
    if b in node.inputs:
        return []
    for v in node.inputs:
        src = v.producer() if v is not None else None
        if src is None or len(list(v.uses())) != 1:
            continue
        if src.op_type == "Pad" and src.inputs[0] is b:
            return [src]
        if src.op_type == "Concat":
            pads = [i.producer() if i is not None else None for i in src.inputs]
            if all(p is not None and p.op_type == "Pad" and len(list(p.outputs[0].uses())) == 1 for p in pads) and any(
                p.inputs[0] is b for p in pads
            ):
                return [*pads, src]
    return None


def strip_branches(model: ir.Model, manifest: SlotManifest) -> None:
    """Remove every LoRA/DoRA branch and slot input of ``manifest`` from ``model`` (in place)."""
    if manifest.vera is not None:
        # VeRA's vector slots default to rank 0 too: the twin would buy nothing for its copy of the weights.
        raise ModelError("base_session=True is not supported for VeRA-injected models (no adapter costs nothing)")
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    doomed: list[ir.Node] = []
    stripped: set[str] = set()
    for module, slot in sorted(manifest.slots.items()):
        a, b = inputs.get(slot.a), inputs.get(slot.b)
        if a is None or b is None:
            raise ModelError(f"{module}: slot inputs {slot.a}/{slot.b} are not graph inputs")
        # Slots of a shared group read one A′: its uses are all their branches, stripped once.
        uses = [] if slot.a in stripped else list(a.uses())
        stripped.add(slot.a)
        for use in uses:
            node_a, chain = use.node, []
            if node_a.op_type == "Concat":  # a packed op's one branch for all its slots: stripped once
                chain.append(node_a)
                stripped.update(v.name for v in node_a.inputs if v is not None)
                node_a = _only_use(node_a.outputs[0], module)
            chain.append(node_a)
            node = node_a
            b_side = _b_side(node_a, b)  # A′·Pad(B′) in one op: an effective packed weight (plugins)
            if b_side is None:
                node = _only_use(node_a.outputs[0], module)  # B′ op
                chain.append(node)
                b_side = _b_side(node, b)
                if b_side is None:
                    raise ModelError(f"{module}: {node.name!r} does not read {slot.b}")
            doomed.extend(b_side)
            node = _only_use(node.outputs[0], module)
            if node.op_type == "Pad":  # this slot's delta padded to its place beside the others'
                node = _only_use(node.outputs[0], module)
            if node.op_type == "Concat":  # a packed op's slots' deltas side by side: strip them all once
                chain.append(node)
                for d in node.inputs:
                    b_op = d.producer()
                    if b_op is not None and b_op.op_type == "Pad":  # zeros for columns no slot covers
                        doomed.append(b_op)
                        b_op = b_op.inputs[0].producer()
                    a_op = b_op.inputs[0].producer() if b_op is not None else None
                    if b_op is None or a_op is None or b_op.op_type != "MatMul" or a_op.op_type != "MatMul":
                        raise ModelError(f"{module}: {node.name!r} does not join LoRA deltas")
                    doomed.extend(n for n in (a_op, b_op) if n not in chain)
                    stripped.add(a_op.inputs[1].name)
                node = _only_use(node.outputs[0], module)
            if node.op_type == "Mul":  # Gemm's alpha
                chain.append(node)
                node = _only_use(node.outputs[0], module)
            if node.op_type != "Add" or node.inputs[1] is not chain[-1].outputs[0]:
                raise ModelError(f"{module}: no Add(base, delta) after its branch")
            chain.append(node)
            _replace(graph, node.outputs[0], node.inputs[0])
            doomed.extend(chain)
        if slot.dora:
            g = inputs.get(slot.dora)
            if g is None:
                raise ModelError(f"{module}: {slot.dora} is not a graph input")
            for use in list(g.uses()):
                chain = [use.node]
                if use.node.op_type == "Reshape":
                    chain.append(_only_use(use.node.outputs[0], module))
                mul = chain[-1]
                if mul.op_type != "Mul":
                    raise ModelError(f"{module}: {slot.dora} does not feed a Mul")
                _replace(graph, mul.outputs[0], mul.inputs[0])
                doomed.extend(chain)
    graph.remove(doomed, safe=True)
    for name in sorted({n for s in manifest.slots.values() for n in s.inputs}):
        graph.inputs.remove(inputs[name])
        graph.initializers.pop(name, None)
    # Constants only the branches used (reshape targets, alpha/beta) are dead now.
    used = {v.name for n in graph for v in n.inputs if v is not None} | {v.name for v in graph.outputs}
    for name in [k for k in graph.initializers if k not in used and k not in {v.name for v in graph.inputs}]:
        del graph.initializers[name]


def shared_initializers(
    model: ir.Model, device_type: str = "cpu", device_id: int = 0, min_bytes: int = SHARE_MIN_BYTES
) -> dict[str, ort.OrtValue]:
    """OrtValues over the large initializers of ``model`` (CPU: zero-copy views of its tensors' memory)."""
    values: dict[str, ort.OrtValue] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < min_bytes:
            continue
        array = tensor.numpy()
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
            continue  # bfloat16/float8 (ml_dtypes) and strings: leave them in the model
        array = np.ascontiguousarray(array)
        values[name] = ort.OrtValue.ortvalue_from_numpy(array, device_type, device_id)
    return values


def twin_proto(model: ir.Model, shared: Mapping[str, ort.OrtValue]) -> bytes:
    """``model`` serialized with the ``shared`` initializers as data-less external placeholders.

    The session fills them from the same OrtValues through ``SessionOptions.add_external_initializers``.
    """
    saved = {}
    try:
        for name, value in model.graph.initializers.items():
            if name in shared and value.const_value is not None:
                tensor = value.const_value
                saved[name] = tensor
                value.const_value = ir.ExternalTensor(
                    _PLACEHOLDER, offset=0, length=tensor.nbytes, dtype=tensor.dtype, shape=tensor.shape, name=name
                )
        return ir.to_proto(model).SerializeToString()
    finally:
        for name, tensor in saved.items():
            model.graph.initializers[name].const_value = tensor

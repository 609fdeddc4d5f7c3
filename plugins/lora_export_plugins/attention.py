"""ONNX Runtime's fused ``Attention`` (com.microsoft) as a LoRA target: its packed Q/K/V weight and bias.

``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` replaces BERT's query/key/value
MatMuls and bias Adds by one ``Attention(x, W, bias, mask_index, ...)`` node: W (in, q+k+v) is
``concat([Wqᵀ, Wkᵀ, Wvᵀ], axis=1)`` (widths in ``qkv_hidden_sizes`` when they differ) and bias the three
biases end to end. The layout stores like MatMul's (in, out) and is a ``packed_weight`` layout: names say
nothing about which columns are whose, so a target resolves to its slice of W only by value
(``--base-weights``, see ``lora_export.graph.ops.packed``).

- ``merge`` writes W₀ + ΔW into the target's slice only (the other slices stay bit-identical); DoRA merges
  too (its norm is per output row, and a slice holds whole rows). A trained bias of a target (PEFT
  ``bias="lora_only"``) is written into the matching slice of the packed bias (``graph.packed_bias``).
- ``inject``: the projection happens inside the op, so no side branch can reach its output. The op is fed an
  effective weight computed in the graph instead, W_eff = W + A_cat·B_cat (one MatMul and one Add before
  the op: its targets' A′ concatenated, their B′ each padded into its slice and stacked, see
  ``lora_export.graph.ops.packed_branch``): exactly what a merge of the active adapter stores, computed per run
  at Σr·in·(q+k+v) multiply-adds, independent of batch and sequence length.
  q, k and v slots of different ranks share the op; with no adapter (rank-0 defaults) A′·Pad(B′) is a zero
  matrix and W_eff = W bit for bit. ONNX Runtime's CPU Attention kernel takes a computed weight (checked
  with 1.31/1.32), but pre-packs only a constant one: the injected op runs its unpacked GEMM, a little slower
  and, on larger shapes, rounded differently (all-MiniLM-L6-v2 without adapter: 3.7e-7 relative to the
  untouched file; tiny BERT: bit for bit). ``LoraSession(base_session=True)`` strips the chain again. A DoRA
  branch is refused (g would scale the whole packed output): merge DoRA adapters.

``MultiHeadAttention`` (``FusionOptions.use_multi_head_attention``) needs no layout: it takes the outputs
of the separate q/k/v MatMuls, which stay ordinary targets; only their biases are packed into its input 3,
and trained biases there are refused (never proven absent).
"""

from __future__ import annotations

import onnx_ir as ir

from lora_export.errors import ModelError
from lora_export.graph.ops.layouts import MatMulLayout, register_layout, through_transpose

_X, _W, _BIAS = range(3)


def _is_slot_delta(value: ir.Value | None) -> bool:
    """Whether ``value`` is an injected A′·B′ (a MatMul reading a ``.lora_A`` graph input, or a Concat of them)."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "MatMul" or not node.inputs:
        return False
    a = node.inputs[0]
    group = a.producer() if a is not None else None
    # Several slots of one op share one delta: their A′ inputs concatenated (lora_export.graph.ops.packed_branch).
    slots = group.inputs if group is not None and group.op_type == "Concat" else [a]
    return all(v is not None and v.is_graph_input() and (v.name or "").endswith(".lora_A") for v in slots)


def behind_deltas(value: ir.Value | None) -> ir.Value | None:
    """The weight an injected effective-weight chain Add(…Add(W, Δ₁)…, Δₙ) starts from (``value`` itself
    when nothing was injected)."""
    while value is not None and value.const_value is None:
        node = value.producer()
        if node is None or node.op_type != "Add" or len(node.inputs) != 2 or not _is_slot_delta(node.inputs[1]):
            break
        value = node.inputs[0]
    return value


class AttentionLayout(MatMulLayout):
    """com.microsoft Attention: input 1 is the packed weight (in, q+k+v), input 2 the packed bias."""

    op_type = "Attention"
    domain = "com.microsoft"
    kind = "linear"
    packed_weight = True

    def _source(self, node: ir.Node) -> tuple[ir.Value | None, bool]:
        if len(node.inputs) <= _W or node.inputs[_X] is None or node.inputs[_X].const_value is not None:
            return None, False
        value, via_transpose = through_transpose(behind_deltas(node.inputs[_W]))
        if value is None or len(value.const_value.shape) != 2:
            return None, False
        return value, via_transpose

    def _sizes(self, node: ir.Node) -> list[int] | None:
        attr = node.attributes.get("qkv_hidden_sizes")
        return list(attr.as_ints()) if attr is not None else None

    def describe(self, node: ir.Node) -> str:
        shape = self.weight_shape(node)
        sizes = self._sizes(node) or ([shape[0] // 3] * 3 if shape else [])
        return f"Attention packed Q|K|V W(in, {'+'.join(map(str, sizes))})"

    def packed_bias(self, node: ir.Node) -> ir.Value | None:
        value = node.inputs[_BIAS] if len(node.inputs) > _BIAS else None
        shape = self.weight_shape(node)
        if value is None or value.const_value is None or shape is None:
            return None
        return value if tuple(int(d) for d in value.const_value.shape) == (shape[0],) else None

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        """Feed the op W + A′·B′ (B′ already padded to the packed width, its slots grouped, by inject): see the
        module docstring. A further branch on the same op would chain one more Add onto the effective weight."""
        from lora_export.graph.ops.branches import _prefix

        prefix = _prefix(graph, node, a_value)
        if dora_scale_value is not None:
            raise ModelError(f"{prefix}: DoRA on ONNX Runtime's fused Attention cannot be injected; merge it")
        if self._source(node)[0] is None:
            raise ModelError(f"{node.name or node.op_type}: its packed weight is not a constant 2-D tensor")
        delta = ir.node("MatMul", [a_value, b_value], name=f"{prefix}/lora_weight_delta")
        delta.outputs[0].name = f"{prefix}/lora_weight_delta"
        add = ir.node("Add", [node.inputs[_W], delta.outputs[0]], name=f"{prefix}/lora_weight")
        add.outputs[0].name = f"{prefix}/lora_weight"
        node.graph.insert_before(node, [delta, add])
        node.replace_input_with(_W, add.outputs[0])


LAYOUT = AttentionLayout()


def register() -> None:
    """Entry point (``lora_export.op_layouts``): register the Attention layout (idempotent)."""
    register_layout(LAYOUT, replace=True)

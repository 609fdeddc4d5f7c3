"""Ranks of a graph's values, for ``per_row``: a per-row slot needs a batch-first activation (rank >= 3).

Declared where the model records them, else by ONNX shape inference, else carried forward through ops
whose output rank follows from their inputs' — ONNX inference stops at ONNX Runtime's contrib ops
(MatMulNBits, EmbedLayerNormalization, the fused attentions, ...), whose ranks are known here.
"""

from __future__ import annotations

import onnx_ir as ir


class ActivationRanks:
    """Ranks of graph values: declared where the model records them, else by ONNX shape inference, else
    carried forward through rank-keeping ops (ONNX inference stops at contrib ops such as MatMulNBits)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._ranks: dict[int, int] | None = None

    def rank(self, value: ir.Value | None) -> int | None:
        if value is None:
            return None
        if value.shape is not None:
            return len(value.shape)
        if self._ranks is None:
            self._ranks = self._forward(_inferred_ranks(self.model))
        return self._ranks.get(id(value))

    def _forward(self, inferred: dict[str, int]) -> dict[int, int]:
        ranks: dict[int, int] = {}

        def known(v: ir.Value | None) -> int | None:
            if v is None:
                return None
            if v.shape is not None:
                return len(v.shape)
            return ranks.get(id(v), inferred.get(v.name or ""))

        for node in ir.traversal.RecursiveGraphIterator(self.model.graph):
            for out in node.outputs:
                r = known(out)
                if r is None:
                    r = _rule(node, known, node.outputs.index(out))
                if r is not None:
                    ranks[id(out)] = r
        return ranks


def _rule(node: ir.Node, known, index: int = 0) -> int | None:
    op = node.op_type
    if node.domain == "com.microsoft" and op in _CONTRIB_RANKS:
        return _CONTRIB_RANKS[op](node, known) if index == 0 else None
    keepdims = node.attributes.get("keepdims")
    if op.startswith("Reduce") and (keepdims is None or keepdims.as_int() == 1):
        return known(node.inputs[0])
    if op in _SAME_RANK or (op == "MatMulNBits" and node.domain == "com.microsoft"):
        return known(node.inputs[0])
    if op == "Gather" and len(node.inputs) == 2:
        data, idx = known(node.inputs[0]), known(node.inputs[1])
        return None if data is None or idx is None else data - 1 + idx
    if op in _BROADCAST or op == "MatMul":  # MatMul of rank >= 2 operands broadcasts like them
        ranks = [known(i) for i in node.inputs if i is not None]
        return None if not ranks or None in ranks else max(ranks)
    return None


# Ops whose output has the rank of their first input / of their broadcast inputs (for ``_ActivationRanks``).
_SAME_RANK = {
    "Cast", "Identity", "Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Sqrt", "Softmax", "Gelu", "FastGelu", "QuickGelu",
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "Silu", "Dropout", "Reciprocal", "Exp", "Log", "Abs", "Split", "Slice", "Transpose", "Pad", "Concat",
}  # fmt: skip
_BROADCAST = {"Add", "Mul", "Sub", "Div", "Pow", "Where", "Max", "Min"}


def _plus(k: int, i: int = 0):
    """Rank of input ``i`` plus ``k``."""

    def rule(node: ir.Node, known) -> int | None:
        r = known(node.inputs[i]) if len(node.inputs) > i else None
        return None if r is None else r + k

    return rule


def _product(node: ir.Node, known) -> int | None:
    """A (quantized or fused) MatMul: the broadcast rank of its two operands."""
    ranks = [known(v) for v in node.inputs[:2]]
    return None if None in ranks else max(ranks)


# ONNX Runtime's contrib ops (ONNX shape inference stops at them): the rank of output 0.
_CONTRIB_RANKS = {
    "EmbedLayerNormalization": _plus(1),  # ids (batch, seq) → (batch, seq, hidden)
    "Attention": lambda node, known: 3,  # (batch, seq, hidden), whatever the packing of its inputs
    "MultiHeadAttention": lambda node, known: 3,
    "GroupQueryAttention": lambda node, known: 3,
    "RotaryEmbedding": _plus(0),
    "BiasGelu": _plus(0),
    "BiasAdd": _plus(0),
    "FusedMatMul": _product,
    "DynamicQuantizeMatMul": _product,
    "MatMulIntegerToFloat": _product,
}


def _inferred_ranks(model: ir.Model) -> dict[str, int]:
    import onnx

    proto = ir.serde.serialize_model(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - no inferred shapes: unknown ranks are refused by the caller
        return {}
    out: dict[str, int] = {}

    def walk(g) -> None:
        for vi in [*g.value_info, *g.input, *g.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                out[vi.name] = len(vi.type.tensor_type.shape.dim)
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(proto.graph)
    return out

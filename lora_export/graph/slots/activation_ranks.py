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

    def _forward(self, inferred: tuple[dict[str, int], dict[str, int]]) -> dict[int, int]:
        table = _Table(*inferred)
        for node in ir.traversal.RecursiveGraphIterator(self.model.graph):
            for index, out in enumerate(node.outputs):
                r = table(out)
                if r is None:
                    r = _rule(node, table, index)
                if r is not None:
                    table.ranks[id(out)] = r
                if r == 1 and table.length(out) is None:  # shape tensors: their length is a Reshape's rank
                    n = _length_rule(node, table)
                    if n is not None:
                        table.lengths[id(out)] = n
        return table.ranks


class _Table:
    """Known ranks, and lengths of 1-D values (shape tensors), as the forward pass finds them."""

    def __init__(self, inferred_ranks: dict[str, int], inferred_lengths: dict[str, int]) -> None:
        self.ranks: dict[int, int] = {}
        self.lengths: dict[int, int] = {}
        self._inferred_ranks, self._inferred_lengths = inferred_ranks, inferred_lengths

    def __call__(self, v: ir.Value | None) -> int | None:
        if v is None:
            return None
        if v.shape is not None:
            return len(v.shape)
        return self.ranks.get(id(v), self._inferred_ranks.get(v.name or ""))

    def length(self, v: ir.Value | None) -> int | None:
        if v is None:
            return None
        if v.const_value is not None:
            return int(v.const_value.shape[0]) if len(v.const_value.shape) == 1 else None
        if v.shape is not None and len(v.shape) == 1 and isinstance(v.shape[0], int):
            return int(v.shape[0])
        return self.lengths.get(id(v), self._inferred_lengths.get(v.name or ""))


def _axes_count(node: ir.Node, table: _Table) -> int | None:
    """How many axes an Unsqueeze/Squeeze names (attribute before opset 13, input 1 after)."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return len(attr.as_ints())
    return table.length(node.inputs[1]) if len(node.inputs) > 1 else None


def _length_rule(node: ir.Node, table: _Table) -> int | None:
    op = node.op_type
    if op == "Concat":
        lengths = [table.length(v) for v in node.inputs]
        return None if None in lengths else sum(lengths)
    if op == "Unsqueeze" and table(node.inputs[0]) == 0:
        return _axes_count(node, table)
    if op == "Shape" and "start" not in node.attributes and "end" not in node.attributes:
        return table(node.inputs[0])
    if op in ("Cast", "Identity", "Abs", "Neg"):
        return table.length(node.inputs[0])
    if op == "Constant" and "value" in node.attributes:
        shape = node.attributes["value"].as_tensor().shape
        return int(shape[0]) if len(shape) == 1 else None
    return None


def _rule(node: ir.Node, known: _Table, index: int = 0) -> int | None:
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
    return _reshaping_rule(node, known)


def _reshaping_rule(node: ir.Node, known: _Table) -> int | None:
    """Ops whose output rank comes from a shape tensor's length or a count of axes."""
    op = node.op_type
    if op in ("Reshape", "ConstantOfShape"):
        return known.length(node.inputs[1 if op == "Reshape" else 0])
    if op == "Expand":
        r, n = known(node.inputs[0]), known.length(node.inputs[1])
        return None if r is None or n is None else max(r, n)
    if op in ("Unsqueeze", "Squeeze"):
        r, n = known(node.inputs[0]), _axes_count(node, known)
        return None if r is None or n is None else r + n if op == "Unsqueeze" else r - n
    if op in ("Shape", "Range"):
        return 1
    if op == "Constant" and "value" in node.attributes:
        return len(node.attributes["value"].as_tensor().shape)
    return None


# Ops whose output has the rank of their first input / of their broadcast inputs (for ``_ActivationRanks``).
_SAME_RANK = {
    "Cast", "Identity", "Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Sqrt", "Softmax", "Gelu", "FastGelu", "QuickGelu",
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "Silu", "Dropout", "Reciprocal", "Exp", "Log", "Abs", "Split", "Slice", "Transpose", "Pad", "Concat", "Not",
    "Trilu", "Sin", "Cos",
}  # fmt: skip
_BROADCAST = {
    "Add", "Mul", "Sub", "Div", "Pow", "Where", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual", "And", "Or", "Mod",
}  # fmt: skip


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


def _inferred_ranks(model: ir.Model) -> tuple[dict[str, int], dict[str, int]]:
    """ONNX shape inference's ranks by value name, and the static lengths of 1-D values."""
    import onnx

    proto = ir.serde.serialize_model(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - no inferred shapes: unknown ranks are refused by the caller
        return {}, {}
    ranks: dict[str, int] = {}
    lengths: dict[str, int] = {}

    def walk(g) -> None:
        for vi in [*g.value_info, *g.input, *g.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims = vi.type.tensor_type.shape.dim
                ranks[vi.name] = len(dims)
                if len(dims) == 1 and dims[0].HasField("dim_value"):
                    lengths[vi.name] = dims[0].dim_value
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(proto.graph)
    return ranks, lengths

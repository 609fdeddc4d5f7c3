"""com.microsoft ``FusedMatMul``: ONNX Runtime's fusion of ``MatMul(x, Transpose(W))`` (and a scalar ``Mul``).

ONNX Runtime writes it into models saved at the extended optimization level
(``SessionOptions.optimized_model_filepath``). ``Y = alpha · op(X) · op(W)``, where ``transB=1`` means W is
stored ``(out, in)`` (the canonical Linear layout) and ``transB=0`` means ``(in, out)``.

Only the plain form is a LoRA-able weight: ``alpha == 1``, no ``transA`` and no batch transposes. A scaled
product would make the stored tensor ``W/alpha``: writing ``W₀ + ΔW`` back would round twice, and a
``--base-weights`` match would compare scaled values, so such nodes are left to the "unmatched" refusal
rather than guessed at. This module is also the worked example of the plugin API in the README.
"""

from __future__ import annotations

import onnx_ir as ir

from lora_export.graph.ops.layouts import GemmLayout, register_layout


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    return attr.as_float() if attr.type == ir.AttributeType.FLOAT else attr.as_int()


class FusedMatMulLayout(GemmLayout):
    """FusedMatMul(x, W): W stored (out, in) with transB=1, (in, out) with transB=0 — Gemm's storage rules
    (``weight_shape``/``read``/``write`` are Gemm's); what differs is which nodes qualify and the branch."""

    op_type = "FusedMatMul"
    domain = "com.microsoft"
    kind = "linear"

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[0].const_value is not None:
            return None
        if _attr(node, "alpha", 1.0) != 1.0 or any(_attr(node, a, 0) for a in ("transA", "transBatchA", "transBatchB")):
            return None
        value = node.inputs[1]
        if value is None or value.const_value is None or len(value.const_value.shape) != 2:
            return None
        return value

    def describe(self, node: ir.Node) -> str:
        return "FusedMatMul W(out,in) transB=1" if self._trans_b(node) else "FusedMatMul Wᵀ(in,out) transB=0"

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        # The branch reads the op's own input x: the same (x·A′)·B′ as for a MatMul.
        from lora_export.graph.ops.branches import matmul_branch

        matmul_branch(graph, node, a_value, b_value, dora_scale_value)


LAYOUT = FusedMatMulLayout()


def register() -> None:
    """Entry point (``lora_export.op_layouts``): register the FusedMatMul layout (idempotent)."""
    register_layout(LAYOUT, replace=True)

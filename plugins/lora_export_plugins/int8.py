"""int8/uint8 weights as ONNX Runtime's quantizer writes them (``onnxruntime.quantization``).

Two patterns, both with a constant quantized weight Wq stored (in, out), a float scale and an integer zero
point, per tensor (scalar) or per output channel ((out,), axis 1):

* QDQ (``quantize_static(quant_format=QDQ)``): ``DequantizeLinear(Wq, scale, zp) → MatMul(x, ·)``. The layout
  is keyed on the DequantizeLinear node (it is the op that reads the weight); its branch attaches to the
  MatMul's output, or after the output's QuantizeLinear → DequantizeLinear pair when the activations are
  quantized too, so the LoRA term is not rounded to the (adapter-less) output scale.
  ORT names these nodes after the weight (``onnx::MatMul_650_DequantizeLinear``), so a TorchScript export
  carries no module path in them: resolve with ``--base-weights`` (``holds``: dequantized W within scale/2).
* Dynamic (``quantize_dynamic``): ``DynamicQuantizeLinear(x) → MatMulInteger(x_q, Wq, x_zp, w_zp) → Cast →
  Mul(·, Mul(x_scale, w_scale))``. Keyed on MatMulInteger (named ``/…/q_proj/MatMul_quant``: resolved by
  name); the branch takes the float x (DynamicQuantizeLinear's input) and adds to the float output.
  An ORT-optimized file holds the same as one ``com.microsoft`` node: ``DynamicQuantizeMatMul(x, Wq, w_scale,
  w_zp, bias)`` or ``MatMulIntegerToFloat(x_q, Wq, x_scale, w_scale, x_zp, w_zp, bias)``; both are handled.

merge: dequantize, add ΔW in float32, requantize with the same scheme (dtype, per-tensor/per-channel,
symmetric or not; scale and zero point recomputed from the merged weight as ORT's quantizer does), rounding
once. The error is recorded in ``layout.last_write_report``. Quantized tensors shared with other nodes are
refused (one line): a merge would change the other readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from lora_export.errors import ModelError
from lora_export.graph.ops.layouts import DequantizedConstant, OpLayout, register_layout

from .int8_weights import (
    _DQ_TYPES,
    QWeight,
    _const,
    _holds,
    _is,
    _qweight,
    _scalar,
    _single_use,
    _table_axis,
    dequantize_linear,
    write_quantized,
)


class DequantizeLinearLayout(OpLayout):
    """DequantizeLinear of a constant int8/uint8 weight (in, out) feeding a MatMul's B input."""

    op_type = "DequantizeLinear"
    kind = "linear"
    lossy_write = True  # merge requantizes: only with --requantize

    def __init__(self) -> None:
        self.last_write_report: dict | None = None

    def _parse(self, node: ir.Node) -> tuple[QWeight, list[ir.Node]] | None:
        if "block_size" in node.attributes and node.attributes["block_size"].as_int() != 0:
            return None
        ins = list(node.inputs) + [None] * (3 - len(node.inputs))
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
        qw = _qweight(ins[0], ins[1], ins[2], axis)
        if qw is None:
            return None
        users = [u for u in node.outputs[0].uses()]
        if not users or any(not _is(u.node, "MatMul") or u.idx != 1 for u in users):
            return None
        if any(_const(u.node.inputs[0]) for u in users):
            return None
        return qw, [u.node for u in users]

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        parsed = self._parse(node)
        return parsed[0].q if parsed else None

    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        parsed = self._parse(node)
        if parsed is None:
            return None
        fan_in, fan_out = (int(d) for d in parsed[0].q.const_value.shape)
        return fan_out, fan_in

    def _checked(self, node: ir.Node) -> tuple[QWeight, ir.Node]:
        qw, matmuls = self._parse(node)
        qw.check_private([node], node.name or "DequantizeLinear")
        if len(matmuls) != 1 or node.outputs[0].is_graph_output():
            raise ModelError(
                f"{node.name or 'DequantizeLinear'}: its dequantized weight feeds {len(matmuls)} MatMuls; "
                "a LoRA change would change them all"
            )
        return qw, matmuls[0]

    def read(self, node: ir.Node) -> np.ndarray:
        return self._checked(node)[0].dequantized().T

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        qw, _ = self._checked(node)
        self.last_write_report = write_quantized(qw, canonical)

    def describe(self, node: ir.Node) -> str:
        parsed = self._parse(node)
        if parsed is None:
            return "DequantizeLinear"
        s = parsed[0].scheme()
        return f"QDQ {s['dtype']} {s['granularity']}{' symmetric' if s['symmetric'] else ''} Wᵀ(in,out) → MatMul"

    def holds(self, node: ir.Node, w: np.ndarray) -> bool:
        parsed = self._parse(node)
        return parsed is not None and _holds(parsed[0], w)

    def activation_dtype(self, node: ir.Node) -> ir.DataType:
        return self._parse(node)[0].scale.const_value.dtype

    def dequantized_constant(self, node: ir.Node) -> DequantizedConstant | None:
        """The integer constant this node dequantizes, whatever reads its output: read directly (per tensor, per
        axis or blocked), or through ``Gather(table, indices)`` of its rows (quantized embeddings; per tensor, or
        per axis along a table dimension), the table being what was quantized."""
        ins = list(node.inputs) + [None] * (3 - len(node.inputs))
        x, scale, zp = ins[:3]
        if not _const(scale) or (zp is not None and not _const(zp)) or x is None:
            return None
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
        block = node.attributes["block_size"].as_int() if "block_size" in node.attributes else 0
        reader, table = node, x
        if not _const(x):
            gather = x.producer()
            if not _is(gather, "Gather") or gather.outputs[0] is not x or _single_use(x) is not node or block:
                return None
            reader, table = gather, gather.inputs[0]
            axis = _table_axis(gather, x, axis, _scalar(scale))
            if not _const(table) or axis is None:
                return None
        dt = table.const_value.dtype
        if dt not in _DQ_TYPES or (zp is not None and zp.const_value.dtype != dt):
            return None
        dtype = scale.const_value.dtype.numpy()

        def values() -> tuple[np.ndarray, np.ndarray]:
            zp_arr = zp.const_value.numpy() if zp is not None else None
            got = dequantize_linear(table.const_value.numpy(), scale.const_value.numpy(), zp_arr, axis, block, dtype)
            if got is None:  # shapes that do not broadcast as DequantizeLinear defines: holds nothing
                q = table.const_value.numpy()
                return np.full(q.shape, np.nan, np.float32), np.zeros(q.shape, np.float32)
            return got

        return DequantizedConstant(table, reader, values)

    def to_float(self, model: ir.Model, node: ir.Node) -> ir.Node:
        """``merge --into-float``: the MatMul reads the dequantized weight (in the scale's dtype) as a float
        initializer instead of DequantizeLinear's output; returns the MatMul."""
        from lora_export.graph.ops.float_convert import float_names

        qw, matmul = self._checked(node)
        dtype = self.activation_dtype(node)
        _, wname = float_names(model, node, qw.q)
        w = ir.Value(name=wname, const_value=ir.tensor(qw.dequantized().astype(dtype.numpy()), dtype=dtype, name=wname))
        graph = node.graph
        graph.register_initializer(w)
        matmul.replace_input_with(1, w)
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for v in inputs:
            if v.const_value is not None and not v.uses() and not v.is_graph_output() and v.name in graph.initializers:
                del graph.initializers[v.name]
        return matmul

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        from lora_export.graph.ops.branches import _finish, _prefix

        _, matmul = self._checked(node)
        prefix = _prefix(graph, matmul, a_value)
        x = matmul.inputs[0]
        h = ir.node("MatMul", [x, a_value], name=f"{prefix}/lora_A")
        d = ir.node("MatMul", [h.outputs[0], b_value], name=f"{prefix}/lora_B")
        # Quantized activations: y → QuantizeLinear → DequantizeLinear. Add after the pair, in float, so the
        # LoRA term is neither rounded to nor clipped by an output scale calibrated without it.
        anchor, base = matmul, matmul.outputs[0]
        ql = _single_use(base)
        if _is(ql, "QuantizeLinear"):
            dql = _single_use(ql.outputs[0])
            if _is(dql, "DequantizeLinear"):
                anchor, base = dql, dql.outputs[0]
        _finish(graph, anchor, base, d.outputs[0], [h, d], dora_scale_value, None, None, prefix)


# -- dynamic: DynamicQuantizeLinear → MatMulInteger → Cast → Mul(scales) --------------------------------


@dataclass
class _Dynamic:
    qw: QWeight
    x: ir.Value  # the float input of DynamicQuantizeLinear
    scales_mul: ir.Node  # Mul(x_scale, w_scale)
    out_mul: ir.Node  # Mul(Cast(MatMulInteger), scales): the float output


class MatMulIntegerLayout(OpLayout):
    """MatMulInteger(DynamicQuantizeLinear(x), Wq (in, out), x_zp, w_zp) → Cast → Mul(x_scale·w_scale)."""

    op_type = "MatMulInteger"
    kind = "linear"
    lossy_write = True  # merge requantizes: only with --requantize

    def __init__(self) -> None:
        self.last_write_report: dict | None = None

    def _parse(self, node: ir.Node) -> _Dynamic | None:
        ins = list(node.inputs) + [None] * (4 - len(node.inputs))
        a, b, _, b_zp = ins
        dql = a.producer() if a is not None else None
        if not _is(dql, "DynamicQuantizeLinear") or dql.outputs[0] is not a:
            return None
        cast = _single_use(node.outputs[0])
        if not _is(cast, "Cast"):
            return None
        out_mul = _single_use(cast.outputs[0])
        if not _is(out_mul, "Mul"):
            return None
        scales = out_mul.inputs[1] if out_mul.inputs[0] is cast.outputs[0] else out_mul.inputs[0]
        scales_mul = scales.producer() if scales is not None else None
        if not _is(scales_mul, "Mul") or dql.outputs[1] not in scales_mul.inputs:
            return None
        w_scale = scales_mul.inputs[1] if scales_mul.inputs[0] is dql.outputs[1] else scales_mul.inputs[0]
        qw = _qweight(b, w_scale, b_zp, 1)
        if qw is None:
            return None
        return _Dynamic(qw, dql.inputs[0], scales_mul, out_mul)

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        parsed = self._parse(node)
        return parsed.qw.q if parsed else None

    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        parsed = self._parse(node)
        if parsed is None:
            return None
        fan_in, fan_out = (int(d) for d in parsed.qw.q.const_value.shape)
        return fan_out, fan_in

    def _checked(self, node: ir.Node) -> _Dynamic:
        p = self._parse(node)
        what = node.name or "MatMulInteger"
        p.qw.check_private([node, p.scales_mul], what)
        if len(list(p.scales_mul.outputs[0].uses())) != 1:
            raise ModelError(f"{what}: its scale product {p.scales_mul.outputs[0].name!r} is shared with other nodes")
        return p

    def read(self, node: ir.Node) -> np.ndarray:
        return self._checked(node).qw.dequantized().T

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        self.last_write_report = write_quantized(self._checked(node).qw, canonical)

    def describe(self, node: ir.Node) -> str:
        p = self._parse(node)
        if p is None:
            return "MatMulInteger"
        s = p.qw.scheme()
        return f"dynamic {s['dtype']} {s['granularity']}{' symmetric' if s['symmetric'] else ''} MatMulInteger"

    def holds(self, node: ir.Node, w: np.ndarray) -> bool:
        p = self._parse(node)
        return p is not None and _holds(p.qw, w)

    def activation_dtype(self, node: ir.Node) -> ir.DataType:
        return self._parse(node).qw.scale.const_value.dtype

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        from lora_export.graph.ops.branches import _finish, _prefix

        p = self._checked(node)
        prefix = _prefix(graph, node, a_value)
        h = ir.node("MatMul", [p.x, a_value], name=f"{prefix}/lora_A")
        d = ir.node("MatMul", [h.outputs[0], b_value], name=f"{prefix}/lora_B")
        _finish(graph, p.out_mul, p.out_mul.outputs[0], d.outputs[0], [h, d], dora_scale_value, None, None, prefix)


# -- ORT's fused forms (what an ORT-optimized model file holds, com.microsoft domain) ------------------


class _FusedLayout(OpLayout):
    """Base for one node holding the whole dynamic pattern: float output, weight Wq (in, out) at input 1."""

    domain = "com.microsoft"
    kind = "linear"
    lossy_write = True  # merge requantizes: only with --requantize
    _scale_index: ClassVar[int]
    _zp_index: ClassVar[int]
    _bias_index: ClassVar[int]

    def __init__(self) -> None:
        self.last_write_report: dict | None = None

    def _float_input(self, node: ir.Node) -> ir.Value | None:
        raise NotImplementedError

    def _qw(self, node: ir.Node) -> QWeight | None:
        ins = list(node.inputs) + [None] * (8 - len(node.inputs))
        if ins[0] is None or _const(ins[0]):
            return None
        return _qweight(ins[1], ins[self._scale_index], ins[self._zp_index], 1)

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        qw = self._qw(node)
        return qw.q if qw else None

    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        qw = self._qw(node)
        if qw is None:
            return None
        fan_in, fan_out = (int(d) for d in qw.q.const_value.shape)
        return fan_out, fan_in

    def _checked(self, node: ir.Node) -> QWeight:
        qw = self._qw(node)
        qw.check_private([node], node.name or self.op_type)
        return qw

    def read(self, node: ir.Node) -> np.ndarray:
        return self._checked(node).dequantized().T

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        self.last_write_report = write_quantized(self._checked(node), canonical)

    def describe(self, node: ir.Node) -> str:
        qw = self._qw(node)
        if qw is None:
            return self.op_type
        s = qw.scheme()
        return f"dynamic {s['dtype']} {s['granularity']}{' symmetric' if s['symmetric'] else ''} {self.op_type}"

    def holds(self, node: ir.Node, w: np.ndarray) -> bool:
        qw = self._qw(node)
        return qw is not None and _holds(qw, w)

    def activation_dtype(self, node: ir.Node) -> ir.DataType:
        return self._qw(node).scale.const_value.dtype

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        from lora_export.graph.ops.branches import _finish, _prefix

        self._checked(node)
        x = self._float_input(node)
        if x is None:
            raise ModelError(
                f"{node.name or self.op_type}: its input is quantized ahead of time (no float activation to branch "
                "from); merge instead"
            )
        prefix = _prefix(graph, node, a_value)
        h = ir.node("MatMul", [x, a_value], name=f"{prefix}/lora_A")
        d = ir.node("MatMul", [h.outputs[0], b_value], name=f"{prefix}/lora_B")
        bias = None
        if dora_scale_value is not None and len(node.inputs) > self._bias_index:
            # DoRA scales W·x + ΔW·x, not the bias: the fused bias moves out, after g's Mul (as for Gemm).
            bias = node.inputs[self._bias_index]
            if bias is not None:
                node.replace_input_with(self._bias_index, None)
        _finish(graph, node, node.outputs[0], d.outputs[0], [h, d], dora_scale_value, bias, None, prefix)


class DynamicQuantizeMatMulLayout(_FusedLayout):
    """com.microsoft DynamicQuantizeMatMul(x, Wq, w_scale, w_zp, bias): ORT's fusion of the dynamic pattern."""

    op_type = "DynamicQuantizeMatMul"
    _scale_index, _zp_index, _bias_index = 2, 3, 4

    def _float_input(self, node: ir.Node) -> ir.Value | None:
        return node.inputs[0]


class MatMulIntegerToFloatLayout(_FusedLayout):
    """com.microsoft MatMulIntegerToFloat(x_q, Wq, x_scale, w_scale, x_zp, w_zp, bias) after DynamicQuantizeLinear."""

    op_type = "MatMulIntegerToFloat"
    _scale_index, _zp_index, _bias_index = 3, 5, 6

    def _float_input(self, node: ir.Node) -> ir.Value | None:
        a = node.inputs[0]
        dql = a.producer() if a is not None else None
        if _is(dql, "DynamicQuantizeLinear") and dql.outputs[0] is a and node.inputs[2] is dql.outputs[1]:
            return dql.inputs[0]
        return None


LAYOUTS = (DequantizeLinearLayout(), MatMulIntegerLayout(), DynamicQuantizeMatMulLayout(), MatMulIntegerToFloatLayout())


def register() -> None:
    """Entry point ``lora_export.op_layouts: int8``; idempotent."""
    for layout in LAYOUTS:
        register_layout(layout, replace=True)

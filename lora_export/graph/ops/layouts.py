"""How each ONNX op stores the weight LoRA targets: a registry keyed by (domain, op_type).

A layout reads a node's weight into the canonical layout of ``LoraTarget.weight_shape`` (Linear
(out, in), Conv (out, in/groups, *k), Embedding (num, dim)) and writes a canonical weight back in the
op's own storage, rounding once into the stored dtype. Plugins add ops (e.g. int4 ``MatMulNBits``)
through ``register_layout`` or the ``lora_export.op_layouts`` entry point, without touching the core.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from lora_export.errors import ModelError, first_line

_REGISTRY: dict[tuple[str, str], OpLayout] = {}
_PLUGINS_LOADED = False


@dataclass(frozen=True)
class InputWeight:
    """A weight that an op takes as graph inputs rather than constants: how LoRA-input models made by other tools
    (Olive's int4 LoRA: ``MatMulNBits`` whose B/scales are inputs) feed their quantized A/B."""

    inputs: tuple[int, ...]  # the node's input indices that together carry the weight (all must be graph inputs)
    shape: tuple[int, int]  # its canonical (rows, cols) shape, fixed by the node's attributes
    dtype: str  # the activations' float dtype (numpy name)
    scheme: str  # how it is stored, for reports ("int4 block 32 symmetric")


@dataclass(frozen=True)
class DequantizedConstant:
    """A constant integer tensor that a node dequantizes (``OpLayout.dequantized_constant``), whatever reads the
    result: lets the absence proof account for quantized tensors no LoRA target reads (quantized embeddings)."""

    value: ir.Value  # the integer constant
    reader: ir.Node  # the node that reads it (the dequantizing node, or the indexing op before it)
    # (its values as dequantized, float32, in the constant's own layout; per-entry bound such that a float W
    # quantized into it by rounding is within the bound everywhere) — computed on demand, it may be large.
    values: Callable[[], tuple[np.ndarray, np.ndarray]]


class OpLayout(ABC):
    """The storage knowledge for one op type. Subclass, set the class fields, and register."""

    op_type: ClassVar[str]
    domain: ClassVar[str] = ""
    kind: ClassVar[str]  # the LoraTarget kind this op can carry: "linear", "conv" or "embedding"
    # True when ``write`` cannot store W₀ + ΔW exactly (requantization): merge then needs --requantize.
    lossy_write: ClassVar[bool] = False
    # True for an op whose weight is always several projections side by side along its output axis (ONNX
    # Runtime's fused ``Attention``: q|k|v): targets resolve only to slices of it, by value (``packed``).
    # Such a layout subclasses MatMulLayout or GemmLayout (their storage orientation is its own).
    packed_weight: ClassVar[bool] = False
    # True when ``add_branch`` adds MatMul(MatMul(node.inputs[0], A′), B′) (Gemm: times α) onto node.outputs[0]:
    # inject may then build one branch for several packed slices of the op itself (``packed_branch``).
    output_branch: ClassVar[bool] = False

    @abstractmethod
    def weight_value(self, node: ir.Node) -> ir.Value | None:
        """The initializer holding the node's weight (identity for resolution and sharing), or None."""

    @abstractmethod
    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        """The weight's canonical shape, read from metadata only (no tensor data is loaded)."""

    @abstractmethod
    def read(self, node: ir.Node) -> np.ndarray:
        """The weight in canonical layout, as float32 (float64 stays float64)."""

    @abstractmethod
    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        """Store a canonical-layout weight, rounded once into the stored dtype."""

    def describe(self, node: ir.Node) -> str:
        """A short human description of how the weight is stored (for ``inspect``)."""
        return self.op_type

    def holds(self, node: ir.Node, w: np.ndarray) -> bool:
        """Whether the node's weight is the base weight ``w`` (torch layout: W or Wᵀ, in the stored dtype).

        Used to check a name match against ``--base-weights``. Quantized layouts override it (their stored
        weight is W only up to the quantization error).
        """
        from ..match.value_match import tensor_equals

        value = self.weight_value(node)
        return value is not None and value.const_value is not None and tensor_equals(value.const_value, w)

    def packed_bias(self, node: ir.Node) -> ir.Value | None:
        """For a ``packed_weight`` op that adds its own bias (Attention's input 2): the initializer holding it,
        laid out along the weight's output axis, so a target's bias is the slice of its weight's rows; else None."""
        return None

    def activation_dtype(self, node: ir.Node) -> ir.DataType:
        """The float dtype of the op's activations, which LoRA slots take: the weight's own dtype here;
        quantized layouts return their scales' dtype."""
        return self.weight_value(node).const_value.dtype

    # -- optional, for lossy (quantized) layouts --------------------------------------------------

    def value_bounds(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
        """(read(node), per-entry bound) such that a float weight W quantizes to this node's weight only if
        |W − read(node)| ≤ bound everywhere; lets a packed slice of a quantized weight be found by value.
        None: not supported (exact layouts compare bit for bit instead)."""
        return None

    def dequantized_constant(self, node: ir.Node) -> DequantizedConstant | None:
        """For a node that dequantizes a constant integer tensor (directly or after a Gather of its rows), that
        tensor and how to read it back; None otherwise. Only the absence proof uses it."""
        return None

    def write_rows(self, node: ir.Node, start: int, rows: np.ndarray) -> None:
        """Store canonical rows [start, start + len(rows)) only, every other row bit-identical (a packed
        slice of a quantized weight)."""
        raise NotImplementedError(f"{self.op_type}: cannot write part of its weight")

    def to_float(self, model: ir.Model, node: ir.Node) -> ir.Node:
        """``merge --into-float``: replace ``node`` by a float MatMul holding ``read(node)`` in
        ``activation_dtype(node)`` (see ``float_convert``) and return it."""
        raise ModelError(f"{self.op_type} {node.name!r}: no float form (--into-float); use --requantize or inject")

    def input_weight(self, node: ir.Node) -> InputWeight | None:
        """For an op that can take its weight as graph inputs: which inputs carry it and its fixed shape (read
        from the node's attributes; one-line ModelError for a form that cannot be written); None: not supported."""
        return None

    def quantize_input_weight(self, node: ir.Node, canonical: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Store a canonical weight in the ``input_weight`` inputs, as the op's own quantizer would (lossy):
        (tensor per input index, in the op's shapes; the canonical weight the op then applies, float32)."""
        raise NotImplementedError(f"{self.op_type}: its weight cannot be written as graph inputs")

    def add_branch(
        self, graph: ir.Graph, node: ir.Node, a_value: ir.Value, b_value: ir.Value, dora_scale_value: ir.Value | None
    ) -> None:
        """Add a LoRA side branch to ``node`` for ``inject``: y = op(x) + (x·A′)·B′ (scale folded into B′),
        or with ``dora_scale_value`` g: y = g ⊙ (op(x) without bias + (x·A′)·B′) + bias.

        A′/B′ layouts by kind: linear (in, r)/(r, out); embedding (num, r)/(r, dim); conv A (r, in, *k) and
        B (out, r/groups, 1...). Ops without a branch builder cannot be injected (merge still works).
        """
        raise NotImplementedError(f"{self.op_type}: no LoRA branch builder; this op supports merge only")


def register_layout(layout: OpLayout, *, replace: bool = False) -> OpLayout:
    """Register an op layout; plugins call this (directly or via the entry point)."""
    key = (layout.domain or "", layout.op_type)
    if key in _REGISTRY and not replace:
        raise ValueError(f"a layout for {key} is already registered")
    _REGISTRY[key] = layout
    return layout


def get_layout(node: ir.Node) -> OpLayout | None:
    """The registered layout for ``node``'s op, or None."""
    _load_plugins()
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return _REGISTRY.get((domain, node.op_type))


def registered_layouts() -> dict[tuple[str, str], OpLayout]:
    _load_plugins()
    return dict(_REGISTRY)


def _load_plugins() -> None:
    # Entry-point group "lora_export.op_layouts": each entry is a callable that registers layouts.
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group="lora_export.op_layouts"):
        ep.load()()


# -- helpers shared by the built-in layouts ---------------------------------------------------


def through_transpose(value: ir.Value | None) -> tuple[ir.Value | None, bool]:
    """Follow a 2-D Transpose(perm=[1, 0]) back to its initializer: (initializer, transposed?)."""
    if value is None:
        return None, False
    if value.const_value is not None:
        return value, False
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
        perm = node.attributes.get("perm")
        src = node.inputs[0]
        if src is not None and src.const_value is not None and len(src.const_value.shape) == 2:
            if perm is None or list(perm.as_ints()) == [1, 0]:
                return src, True
    return None, False


def to_float(tensor: ir.TensorProtocol) -> np.ndarray:
    # Upcasting fp16/bf16 to fp32 is exact; all arithmetic then runs in fp32.
    if not tensor.dtype.is_floating_point():
        # An integer weight would take the rounded delta silently: not a LoRA-able weight.
        raise ModelError(f"weight {tensor.name!r} has dtype {tensor.dtype.name}; LoRA needs a floating-point weight")
    try:
        arr = tensor.numpy()
    except Exception as e:  # noqa: BLE001 - onnx-ir raises ValueError/TypeError/OSError for corrupt data
        raise ModelError(f"weight {tensor.name!r} cannot be read ({type(e).__name__}: {first_line(e)})") from None
    return arr if arr.dtype == np.float64 else arr.astype(np.float32)


def store(value: ir.Value, stored_layout: np.ndarray) -> None:
    """Replace an initializer's tensor, rounding once into its dtype, keeping its name."""
    old = value.const_value
    dtype = old.dtype
    if tuple(stored_layout.shape) != tuple(old.shape.numpy()):
        raise ModelError(f"{value.name}: new weight shape {stored_layout.shape} != stored {tuple(old.shape)}")
    new = ir.tensor(np.ascontiguousarray(stored_layout).astype(dtype.numpy(), copy=False), dtype=dtype, name=old.name)
    value.const_value = new


def _shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.const_value is None:
        return None
    return tuple(int(d) for d in value.const_value.shape)


# -- the built-in ops --------------------------------------------------------------------------


class MatMulLayout(OpLayout):
    """MatMul(x, W): W stored (in, out) = canonical transposed; also Transpose(W) feeding MatMul."""

    op_type = "MatMul"
    kind = "linear"
    output_branch = True

    def _source(self, node: ir.Node) -> tuple[ir.Value | None, bool]:
        if len(node.inputs) < 2 or (node.inputs[0] is not None and node.inputs[0].const_value is not None):
            return None, False
        value, via_transpose = through_transpose(node.inputs[1])
        if value is None or len(value.const_value.shape) != 2:
            return None, False
        return value, via_transpose

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        return self._source(node)[0]

    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        value, via_transpose = self._source(node)
        shape = _shape(value)
        if shape is None:
            return None
        return shape if via_transpose else shape[::-1]

    def read(self, node: ir.Node) -> np.ndarray:
        value, via_transpose = self._source(node)
        arr = to_float(value.const_value)
        return arr if via_transpose else arr.T

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        value, via_transpose = self._source(node)
        store(value, canonical if via_transpose else canonical.T)

    def describe(self, node: ir.Node) -> str:
        return "MatMul W(out,in) via Transpose" if self._source(node)[1] else "MatMul Wᵀ(in,out)"

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        from .branches import matmul_branch

        matmul_branch(graph, node, a_value, b_value, dora_scale_value)


class GemmLayout(OpLayout):
    """Gemm(x, W, C): W stored (out, in) when transB=1, (in, out) when transB=0."""

    op_type = "Gemm"
    kind = "linear"
    output_branch = True

    def _trans_b(self, node: ir.Node) -> bool:
        attr = node.attributes.get("transB")
        return bool(attr.as_int()) if attr is not None else False

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        trans_a = node.attributes.get("transA")
        if trans_a is not None and trans_a.as_int():
            return None
        value = node.inputs[1] if len(node.inputs) > 1 else None
        return value if value is not None and value.const_value is not None else None

    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        shape = _shape(self.weight_value(node))
        if shape is None:
            return None
        return shape if self._trans_b(node) else shape[::-1]

    def read(self, node: ir.Node) -> np.ndarray:
        arr = to_float(self.weight_value(node).const_value)
        return arr if self._trans_b(node) else arr.T

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        store(self.weight_value(node), canonical if self._trans_b(node) else canonical.T)

    def describe(self, node: ir.Node) -> str:
        return "Gemm W(out,in) transB=1" if self._trans_b(node) else "Gemm Wᵀ(in,out) transB=0"

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        from .branches import gemm_branch

        gemm_branch(graph, node, a_value, b_value, dora_scale_value)


class CanonicalLayout(OpLayout):
    """Base for ops that store the weight in the canonical layout itself (no transpose)."""

    def weight_shape(self, node: ir.Node) -> tuple[int, ...] | None:
        return _shape(self.weight_value(node))

    def read(self, node: ir.Node) -> np.ndarray:
        return to_float(self.weight_value(node).const_value)

    def write(self, node: ir.Node, canonical: np.ndarray) -> None:
        store(self.weight_value(node), canonical)


class ConvLayout(CanonicalLayout):
    """Conv(x, W, b): W stored (out, in/groups, *k), the canonical layout itself."""

    op_type = "Conv"
    kind = "conv"

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        value = node.inputs[1] if len(node.inputs) > 1 else None
        return value if value is not None and value.const_value is not None else None

    def describe(self, node: ir.Node) -> str:
        group = node.attributes.get("group")
        g = group.as_int() if group is not None else 1
        return f"Conv W(out,in/g,k) group={g}"

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        from .branches import conv_branch

        conv_branch(graph, node, a_value, b_value, dora_scale_value)


class GatherLayout(CanonicalLayout):
    """Gather(W, ids) on axis 0: an embedding table stored (num, dim), the canonical layout."""

    op_type = "Gather"
    kind = "embedding"

    def weight_value(self, node: ir.Node) -> ir.Value | None:
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != 0:
            return None
        value = node.inputs[0] if node.inputs else None
        if value is None or value.const_value is None or len(value.const_value.shape) != 2:
            return None
        return value

    def describe(self, node: ir.Node) -> str:
        return "Gather table(num,dim)"

    def add_branch(self, graph, node, a_value, b_value, dora_scale_value=None) -> None:
        from .branches import gather_branch

        gather_branch(graph, node, a_value, b_value, dora_scale_value)


for _layout in (MatMulLayout(), GemmLayout(), ConvLayout(), GatherLayout()):
    register_layout(_layout)

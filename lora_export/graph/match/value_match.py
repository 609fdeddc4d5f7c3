"""Matching graph tensors to base weights by value, and proving a module absent from a graph.

A base weight W (PyTorch layout) is stored by exporters as W or Wᵀ, rounded into the graph's dtype;
it may also be packed beside other weights (fused Q/K/V) or quantized. Comparisons sample a few
entries before reading whole tensors, so unrelated tensors cost almost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .module_paths import best_unique, weight_module

_SAMPLES = 16


def base_key(module: str, base_weights: Mapping[str, np.ndarray]) -> str | None:
    """The key of ``module``'s weight in a base state dict (``<module>.weight``, wrapper prefixes tolerated)."""
    keyed = {m: [k] for k in base_weights if (m := weight_module(k))}
    key, keys, _ = best_unique(module, keyed)
    return keys[0] if key is not None else None


def _views(w: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    views = [w] if w.shape == shape else []
    if w.ndim == 2 and w.T.shape == shape and w.shape != w.T.shape:
        views.append(w.T)
    elif w.ndim == 2 and w.shape == shape and w.shape[0] == w.shape[1]:
        views.append(w.T)
    return views


def tensor_equals(tensor: ir.TensorProtocol, w: np.ndarray) -> bool:
    """Whether ``tensor`` holds W or Wᵀ, rounded into its dtype: a sampled check, then the full one."""
    shape = tuple(int(d) for d in tensor.shape)
    views = _views(np.asarray(w), shape)
    if not views or not tensor.dtype.is_floating_point():
        return False
    try:
        stored = tensor.numpy()
    except Exception:  # noqa: BLE001 - an unreadable tensor is not this weight
        return False
    rng = np.random.default_rng(0)
    idx = tuple(rng.integers(0, s, size=_SAMPLES) for s in shape) if all(shape) else None
    for v in views:
        cast = np.asarray(v).astype(stored.dtype, copy=False)
        if idx is not None and not np.array_equal(stored[idx], cast[idx]):
            continue
        if np.array_equal(stored, cast):
            return True
    return False


def within_bounds(values: np.ndarray, bound: np.ndarray, w: np.ndarray) -> bool:
    """Whether W (or Wᵀ) is within ``bound`` of ``values`` everywhere (a quantized tensor read back): a sampled
    check, then the full one."""
    w = np.asarray(w)
    rng = np.random.default_rng(0)
    shape = values.shape
    idx = tuple(rng.integers(0, s, size=_SAMPLES) for s in shape) if all(shape) else None
    bound = np.broadcast_to(bound, shape)
    for v in _views(w, shape):
        v = np.asarray(v, dtype=np.float32)
        if idx is not None and not np.all(np.abs(v[idx] - values[idx]) <= bound[idx]):
            continue
        if np.all(np.abs(v - values) <= bound):
            return True
    return False


@dataclass(frozen=True)
class QuantHolder:
    """One way the graph reads an integer tensor as float weights: ``holds(w)`` says whether that reading is the
    float weight W (torch layout) up to the quantization rounding; ``holds`` None: a reader no layout explains."""

    name: str
    shape: tuple[int, ...]
    holds: Callable[[np.ndarray], bool] | None

    def fits(self, w: np.ndarray) -> bool:
        return bool(_views(np.asarray(w), self.shape))


def graph_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """Every constant tensor a graph holds: initializers of every (sub)graph and Constant nodes' values."""
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                yield name, value.const_value
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    yield (node.outputs[0].name or node.name or "Constant"), attr.as_tensor()


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class ValueIndex:
    """The graph's constant tensors checked against a base state dict: which ones are accounted for."""

    def __init__(
        self,
        model: ir.Model,
        base_weights: Mapping[str, np.ndarray],
        quantized: Mapping[str, list[QuantHolder]] | None = None,
    ) -> None:
        self.base_weights = base_weights
        self.tensors = list(graph_tensors(model))
        # Integer tensors and how the graph dequantizes them (``absence.quantized_holders``): a tensor is
        # accounted for when every reading of it holds a base weight within its rounding.
        self.quantized = dict(quantized or {})
        self._claimed: set[str] | None = None
        self._quantized_claimed: dict[str, bool] = {}

    def occurs(self, w: np.ndarray) -> str | None:
        """The name of a graph tensor holding W (or Wᵀ) — as such, or quantized within its rounding — or None."""
        for name, tensor in self.tensors:
            if tensor_equals(tensor, w):
                return name
        w = np.asarray(w)
        for name, holders in self.quantized.items():
            if any(h.holds is not None and h.fits(w) and h.holds(w) for h in holders):
                return name
        return None

    def _quantized_accounted(self, name: str) -> bool:
        """Whether every reading of the integer tensor ``name`` holds some base weight within its rounding. A
        target's own weight held this way is caught first by ``occurs``: then it is present, not absent."""
        if name not in self._quantized_claimed:
            holders = self.quantized.get(name, [])
            weights = [np.asarray(w) for w in self.base_weights.values()]
            self._quantized_claimed[name] = bool(holders) and all(
                h.holds is not None and any(h.fits(w) and h.holds(w) for w in weights) for h in holders
            )
        return self._quantized_claimed[name]

    @property
    def claimed(self) -> set[str]:
        """Names of graph tensors equal to some base weight (or too small to hold a weight matrix)."""
        if self._claimed is None:
            by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
            for w in self.base_weights.values():
                w = np.asarray(w)
                by_shape.setdefault(tuple(w.shape), []).append(w)
                if w.ndim == 2:
                    by_shape.setdefault(tuple(w.shape[::-1]), []).append(w)
            claimed = set()
            for name, tensor in self.tensors:
                shape = tuple(int(d) for d in tensor.shape)
                if any(tensor_equals(tensor, w) for w in by_shape.get(shape, [])):
                    claimed.add(name)
            self._claimed = claimed
        return self._claimed

    def unaccounted_for(self, weight_shape: tuple[int, ...]) -> list[str]:
        """Graph tensors equal to no base weight that could still hold a weight of ``weight_shape``:
        big enough, and (for float tensors) sharing a dimension with it, or quantized (integer) data that no
        layout reads back as a base weight."""
        need = _numel(weight_shape)
        dims = set(int(d) for d in weight_shape)
        out = []
        for name, tensor in self.tensors:
            shape = tuple(int(d) for d in tensor.shape)
            numel = _numel(shape)
            if tensor.dtype.is_floating_point():
                if numel < need or not dims & set(shape):
                    continue
            elif tensor.dtype in (ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.STRING) or numel * 8 < need:
                # Shapes, indices and masks; packed low-bit formats hold at most 8 values a byte.
                continue
            if name not in self.claimed and not (name in self.quantized and self._quantized_accounted(name)):
                out.append(name)
        return out


def check_stored_base(adapter, r) -> None:
    """Refuse a resolved target whose adapter stores a base weight that is not the model's."""
    stored = adapter.stored_base.get(r.target.name)
    if stored is None:
        return
    if quantized_holds(r.layout, r.node, stored):
        return
    check_stored_weight(adapter.name, r.target, stored, r.layout.read(r.node), r.value.const_value.dtype.numpy())


def quantized_holds(layout, node, stored: np.ndarray) -> bool:
    """Whether a quantized weight (a ``lossy_write`` layout) holds the float base weight ``stored`` up to its
    rounding, as the layout judges; False for exact layouts (they compare bit for bit instead)."""
    stored = np.asarray(stored)
    return bool(getattr(layout, "lossy_write", False) and stored.ndim == 2 and layout.holds(node, stored))


def check_stored_weight(adapter_name: str, t, stored: np.ndarray, w0: np.ndarray, dtype: np.dtype) -> None:
    """Refuse a base weight stored in an adapter (PEFT's ``save_embedding_layers``) that differs from the
    model's ``w0`` (canonical layout, stored as ``dtype``): the delta was trained against another base,
    and a stored base is never a replacement."""
    from lora_export.errors import ShapeError

    canonical = np.asarray(stored).T if t.fan_in_fan_out else np.asarray(stored)
    if tuple(canonical.shape) != tuple(t.weight_shape):
        raise ShapeError(
            f"adapter {adapter_name!r}: {t.name} stores a base weight of shape {tuple(canonical.shape)}, "
            f"the model's is {tuple(t.weight_shape)} (resized vocabulary?)"
        )
    # Compare in the graph's dtype: the exporter rounded the same weight once into it.
    if not np.array_equal(w0, canonical.astype(dtype).astype(w0.dtype)):
        raise ShapeError(
            f"adapter {adapter_name!r}: {t.name} stores a base weight (PEFT saves embedding layers) that differs "
            "from the model's; the adapter was trained on another base: export that base and merge into it"
        )

"""What a merge decides before any weight changes, and the merged value of one target: shared by
``merge_adapter`` and ``MergedSession`` (which folds the same targets into live weights)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from lora_export.core.adapter import Adapter
from lora_export.core.delta import check_mergeable, merged_weight
from lora_export.errors import AdapterError, ShapeError, TargetError, some

from ..match.value_match import check_stored_base
from ..targets.absence import partial_hint
from ..targets.genai_names import GenaiDims
from ..targets.resolve import Resolution, ResolvedTarget, resolve_targets
from ..targets.vera_bind import bind_to_graph

_LIST_MAX = 5  # names shown in one-line errors before "... (N more)"


def plan_merge(
    model: ir.Model,
    adapter: Adapter,
    *,
    base_weights: Mapping[str, np.ndarray] | None = None,
    scale: float = 1.0,
    allow_partial: bool = False,
    lossy_ok: bool = False,
    genai_dims: GenaiDims | None = None,
    bound: bool = False,
) -> tuple[Adapter, Resolution]:
    """Every check a merge makes before a weight changes: (the scaled adapter, its resolution in ``model``).

    Shared by ``merge_adapter`` and ``MergedSession`` (which folds the same targets into live weights).
    Quantized targets (layouts with ``lossy_write``) are refused unless ``lossy_ok``. ``bound``: VeRA
    adapters are already bound to the graph.
    """
    if not np.isfinite(scale):
        raise AdapterError(f"scale must be finite, got {scale}")
    if not bound:
        adapter = bind_to_graph(model, adapter, base_weights)
    adapter = adapter.scaled(scale)
    adapter.check_finite()
    for t in adapter:
        check_mergeable(t)  # before any weight changes
    resolution = resolve_targets(model, adapter, base_weights=base_weights, genai_dims=genai_dims)
    check_resolution(resolution, adapter, allow_partial)
    for r in resolution.matched:
        check_stored_base(adapter, r)  # before any weight changes
    lossy = [r for r in resolution.matched if getattr(r.layout, "lossy_write", False)]
    if lossy and not lossy_ok:
        names = some([f"{r.target.name} ({r.node.op_type})" for r in lossy], _LIST_MAX)
        raise TargetError(
            f"{len(lossy)} target(s) are quantized weights: {names}; a merge requantizes them (lossy, the error "
            "is reported per target): pass --requantize to accept that, --into-float to make them float MatMuls "
            "(exact), or use inject (exact)"
        )
    return adapter, resolution


def merged_value(r: ResolvedTarget, compute_dtype: np.dtype | type = np.float32) -> np.ndarray:
    """W₀ + ΔW for one resolved target in canonical layout, in ``compute_dtype`` (the layout's ``write``
    rounds it once into the stored dtype). W₀ is what ``r``'s initializer holds now."""
    t = r.target
    w0 = r.layout.read(r.node)
    if t.kind == "linear" and not t.is_dora and w0.flags.f_contiguous and not w0.flags.c_contiguous:
        # Stored transposed (MatMul's Wᵀ): merge the transposed problem, Wᵀ + AᵀBᵀ, so every array
        # stays in storage order; strided adds and transposing copies would dominate the merge time.
        flipped = dataclasses.replace(t, A=t.B.T, B=t.A.T, fan_in_fan_out=False)
        merged = merged_weight(w0.T, flipped, compute_dtype).T
    else:
        merged = merged_weight(w0, t, compute_dtype)
    if not np.isfinite(merged).all():
        raise AdapterError(f"{t.name}: the merged weight contains NaN or Inf")
    return merged


def check_resolution(res: Resolution, adapter: Adapter, allow_partial: bool) -> None:
    mismatched = [r for r in res.unmatched if r.found_shape is not None]
    if mismatched:
        r = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ShapeError(
            f"{r.target.name}: adapter expects a weight of shape {r.target.weight_shape}, "
            f"the model's is {r.found_shape}{more}"
        )
    bad_extra = [e for e in res.extras if e.found_shape is not None]
    if bad_extra:
        e = bad_extra[0]
        raise ShapeError(f"{e.key}: adapter tensor has shape {e.shape}, the model's is {e.found_shape}")
    ambiguous = [r for r in res.unmatched if r.detail.startswith("ambiguous")]
    if ambiguous:
        # Refused whatever --allow-partial says: these targets do occur, we cannot tell where.
        names = some(sorted({r.target.name for r in ambiguous}), _LIST_MAX)
        raise TargetError(f"{len(ambiguous)} target(s) ambiguous: {names}: {ambiguous[0].detail}")
    if not res.matched:
        names = some([r.target.name for r in res.targets], _LIST_MAX)
        detail = res.targets[0].detail if res.targets else ""
        raise TargetError(
            f"none of the adapter's {len(res.targets)} targets ({names}) match a weight in this model "
            f"(adapter for another model?): {res.targets[0].target.name}: {detail}"
        )
    unmatched = [r.target.name for r in res.unmatched] + [e.key for e in res.extras if e.status == "unmatched"]
    if unmatched and not allow_partial:
        details = [r.detail for r in res.unmatched] + [e.detail for e in res.extras if e.status == "unmatched"]
        detail = details[0] if details else ""
        tail = partial_hint(res, detail)
        raise TargetError(f"{len(unmatched)} target(s) not resolved: {some(unmatched, _LIST_MAX)}: {detail}{tail}")

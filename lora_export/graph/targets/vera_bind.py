"""VeRA layer sizes from an ONNX graph: a VeRA file lacks its layers' input sizes, which A′ = Λ_d·A[:, :in] needs.

Each target's weight is found the way resolution finds it (by name; or its shape in ``base_weights``), and
its input size read off the weight's shape. A target not found keeps its placeholder (which fits no
weight), so resolution then reports it as it would any LoRA target: absent with proof, else an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from lora_export.core.adapter import Adapter
from lora_export.core.vera import bind, placeholder_target
from lora_export.errors import TargetError, some

from ..match.value_match import base_key
from .resolve import resolve_targets


def bind_to_graph(model: ir.Model, adapter: Adapter, base_weights: Mapping[str, np.ndarray] | None = None) -> Adapter:
    """``adapter`` compiled for the layer sizes of ``model`` (a no-op unless it is an unbound VeRA adapter)."""
    rec = adapter.vera
    if rec is None or rec.bound:
        return adapter
    # Regenerated projections are sized for every layer of the adapter, not only the selected ones.
    paths = list(rec.vectors) if rec.projection is None else list(adapter.targets)
    fan = adapter.config.fan_in_fan_out
    sizes: dict[str, int] = {}
    for path in paths:
        key = base_key(path, base_weights) if base_weights else None
        if key is not None and np.ndim(base_weights[key]) == 2:
            shape = np.shape(base_weights[key])
            sizes[path] = int(shape[0] if fan else shape[1])
    rest = [p for p in paths if p not in sizes]
    if rest:
        # Placeholders (A′ of width 0) fit no weight: resolution reports the shape it found by name.
        probe = Adapter(
            targets={p: placeholder_target(p, rec.vectors[p], rec.r, fan) for p in rest},
            config=adapter.config,
            name=adapter.name,
        )
        for rt in resolve_targets(model, probe).targets:
            out = int(rec.vectors[rt.target.name].lambda_b.shape[0])
            if rt.found_shape is not None and len(rt.found_shape) == 2 and int(rt.found_shape[0]) == out:
                sizes[rt.target.name] = int(rt.found_shape[1])
    if rec.projection is None and any(p not in sizes for p in paths):
        missing = [p for p in paths if p not in sizes]
        raise TargetError(
            f"adapter {adapter.name!r}: VeRA saved without its projections (save_projection=false); regenerating "
            f"them needs every layer's size, and {some(missing, 4)} has no weight of its output size found "
            "by name: pass --base-weights, or re-save the adapter with save_projection=True"
        )
    return bind(adapter, sizes)

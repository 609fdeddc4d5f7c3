"""Every adapter's targets resolved for ``inject``: one weight per module across adapters, or one line
listing every target that cannot be placed."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from lora_export.core.adapter import Adapter
from lora_export.errors import ShapeError, TargetError, some

from ..match.value_match import check_stored_base
from ..targets.resolve import ResolvedTarget, resolve_targets


def resolve_all(
    model: ir.Model, adapters: Sequence[Adapter], base_weights, genai_dims=None
) -> tuple[dict[str, ResolvedTarget], dict[str, list[dict]], set[str]]:
    """Resolve every adapter; refuse, listing every misfit, if any target cannot be placed."""
    chosen: dict[str, ResolvedTarget] = {}
    reports: dict[str, list[dict]] = {}
    absent: set[str] = set()
    shape_errors, target_errors = [], []
    for adapter in adapters:
        res = resolve_targets(model, adapter, base_weights=base_weights, genai_dims=genai_dims)
        reports[adapter.name] = res.to_report()
        if not res.matched and not res.unmatched:
            target_errors.append(
                f"{adapter.name}: none of its targets occur in the model (adapter for another model?): "
                + some([rt.target.name for rt in res.targets], 4)
            )
        for rt in res.targets:
            name = rt.target.name
            if rt.status == "absent":
                absent.add(name)
            elif rt.status == "unmatched":
                (shape_errors if rt.found_shape is not None else target_errors).append(
                    f"{adapter.name}:{name} ({rt.detail})"
                )
            elif name in chosen and chosen[name].value is not rt.value:
                target_errors.append(f"{adapter.name}:{name} (resolves to another weight than in another adapter)")
            else:
                check_stored_base(adapter, rt)
                chosen.setdefault(name, rt)
    # Across adapters too, a node applies one module: two module paths landing on it are ambiguous.
    owner: dict[int, str] = {}
    for name, rt in sorted(chosen.items()):
        for node in rt.nodes:
            other = owner.setdefault((id(node), getattr(rt.layout, "offset", None)), name)
            if other != name:
                target_errors.append(
                    f"{name} (ambiguous: node {node.name!r} is also {other}; choose with --only-targets REGEX)"
                )
    if shape_errors:
        raise ShapeError(f"adapter targets do not fit the model: {_listed(shape_errors)}")
    if target_errors:
        raise TargetError(f"adapter targets not found in the model: {_listed(target_errors)}")
    return chosen, reports, absent - set(chosen)


def _listed(errors: list[str], limit: int = 4) -> str:
    """``a:x, a:y, ... (n more): <the first reason>``: reasons repeat across targets, one is enough."""
    # Ambiguity first: those targets do occur, and the line should say so.
    errors = sorted(errors, key=lambda e: "(ambiguous" not in e)
    labels = [e.split(" (", 1)[0] for e in errors]
    reason = errors[0].split(" (", 1)[1][:-1] if " (" in errors[0] else ""
    shown = ", ".join(labels[:limit]) + (f", ... ({len(labels) - limit} more)" if len(labels) > limit else "")
    return f"{shown}: {reason}" if reason else shown

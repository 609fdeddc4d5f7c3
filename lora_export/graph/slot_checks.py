"""Checks of a slot manifest read back from a model's metadata: every field well-typed, shared inputs
consistent. A manifest that fails them is corrupt, and nothing is built from it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .. import safejson

if TYPE_CHECKING:
    from .slots import Slot


def sharing_problem(slots: Mapping[str, Slot]) -> str | None:
    """Slots that read one input must read the same pair and agree in everything its shape depends on;
    no name may serve two roles (A of one slot, B or g of another)."""
    by_input: dict[str, Slot] = {}
    for s in slots.values():
        for name in (s.a, s.b):
            first = by_input.setdefault(name, s)
            if first is not s and _pair_key(first) != _pair_key(s):
                return (
                    f"slots {safejson.short_repr(first.module)} and {safejson.short_repr(s.module)} share "
                    f"{safejson.short_repr(name)} but not its pair or shape"
                )
    roles = [n for s in slots.values() for n in (s.dora,) if n] + list(by_input)
    if len(roles) != len(set(roles)) or any(s.a == s.b for s in slots.values()):
        return "an input name serves two roles"
    return None


def _pair_key(s: Slot) -> tuple:
    return (s.a, s.b, s.kind, list(s.weight_shape), s.dtype, s.groups)


def vera_entry_ok(v: object) -> bool:
    """Whether a manifest's ``vera`` entry (the shared projections VeRA slots need) is well-typed."""
    ints = ("key", "r", "max_in", "max_out")
    return (
        isinstance(v, dict)
        and all(type(v.get(k)) is int and v[k] >= 0 for k in ints)
        and isinstance(v.get("sha256"), str)
    )


def slot_problem(slot: Slot) -> str | None:
    """What is ill-typed in a slot parsed from metadata, or None."""
    for name in ("module", "kind", "op", "node", "weight", "dtype", "a", "b"):
        if not isinstance(getattr(slot, name), str):
            return f"{name} is not a string"
    if slot.dora is not None and not isinstance(slot.dora, str):
        return "dora is not a string"
    if not isinstance(slot.vera, bool) or (slot.vera and (slot.kind != "linear" or slot.dora)):
        return "vera is not a flag of a linear slot"
    if slot.kind not in ("linear", "conv", "embedding"):
        return f"unknown kind {safejson.short_repr(slot.kind)}"
    ws = slot.weight_shape
    want_dims = (3, 64) if slot.kind == "conv" else (2, 2)
    if not isinstance(ws, list) or not all(type(d) is int and 0 < d < 2**62 for d in ws):
        return "weight_shape is not a list of positive integers"
    if not want_dims[0] <= len(ws) <= want_dims[1]:
        return f"weight_shape {safejson.short_repr(ws)} does not fit a {slot.kind} weight"
    if type(slot.groups) is not int or slot.groups < 1:
        return "groups is not a positive integer"
    if not floating_dtype(slot):
        return f"unsupported dtype {safejson.short_repr(slot.dtype)}"
    return None


def floating_dtype(slot: Slot) -> bool:
    """Whether the slot's dtype is a floating-point type numpy knows (bfloat16 included)."""
    try:
        return slot.dtype == "bfloat16" or slot.np_dtype.kind == "f"
    except TypeError:  # a dtype numpy does not know (float8 and other ml_dtypes names)
        return False

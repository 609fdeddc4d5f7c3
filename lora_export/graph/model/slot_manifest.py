"""The slot manifest an injected model stores (``metadata_props["lora_export.slots"]``), and its checks.

One ``Slot`` per injected module: where its branch is, which inputs feed it, the shapes they take (the
inputs themselves: ``slots``). The slots of one packed projection (a fused ``qkv_proj``) may read one
concatenated pair (``Slot.packed``): A_cat (in, Σr) and the block-diagonal B_cat (Σr, total), each slot a
row block of B_cat and its own columns [offset, offset + out) of the packed output; older manifests have no
``packed`` entries, and their packed slots each read their own pair.

A manifest read back from a model is checked field by field, shared inputs
included: one that fails is corrupt, and nothing is built from it. Model loading checks it (``model_check``),
so this module needs nothing above the model layer.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from lora_export import safejson
from lora_export.errors import ModelError

SLOTS_KEY = "lora_export.slots"
SLOTS_VERSION = 1


@dataclass
class Slot:
    """One injected module: where its branch is, which inputs feed it, and the shapes they take."""

    module: str
    kind: str  # "linear" | "conv" | "embedding"
    op: str
    node: str  # the primary node the branch was added to (reads the base weight for DoRA)
    weight: str  # the base weight's initializer name
    weight_shape: list[int]  # canonical (LoraTarget.weight_shape) layout
    dtype: str  # numpy dtype name of A′/B′/g, the base weight's dtype
    a: str
    b: str
    dora: str | None = None
    groups: int = 1
    vera: bool = False  # a VeRA vector-only slot: a and b are λ_d (r,) and λ_b (out,)
    # [offset, total]: a slice of a packed op's output whose a/b are the op's concatenated A_cat (in, Σr) and
    # block-diagonal B_cat (Σr, total), shared with the op's other slots (``graph.slots.packed_cat``).
    packed: list[int] | None = None

    @property
    def inputs(self) -> list[str]:
        return [n for n in (self.a, self.b, self.dora) if n]

    @property
    def rank_dim(self) -> str:
        # Named after the A input: slots that share inputs share their rank dimension too.
        stem = self.a[: -len(".lora_A")] if self.a.endswith(".lora_A") else self.module
        return f"{stem}.rank"

    @property
    def shared(self) -> bool:
        """Whether the slot reads a shared group's inputs (named after the group, not the module; a packed
        op's concatenated pair is not a shared LoRA: each slot has its own block)."""
        return self.packed is None and self.a != f"{self.module}.lora_A"

    def a_shape(self, rank: int | str) -> list:
        ws = self.weight_shape
        if self.vera:
            return [rank]
        if self.kind == "linear":
            return [ws[1], rank]
        if self.kind == "embedding":
            return [ws[0], rank]
        return [rank, ws[1] * self.groups, *ws[2:]]

    def b_shape(self, rank: int | str) -> list:
        ws = self.weight_shape
        if self.vera:
            return [ws[0]]
        if self.kind == "linear":
            return [rank, ws[0] if self.packed is None else self.packed[1]]
        if self.kind == "embedding":
            return [rank, ws[1]]
        per_group = rank // self.groups if isinstance(rank, int) else f"{rank}/groups"
        if self.groups == 1:
            per_group = rank
        return [ws[0], per_group, *([1] * (len(ws) - 2))]

    @property
    def out_features(self) -> int:
        return self.weight_shape[1] if self.kind == "embedding" else self.weight_shape[0]

    @property
    def np_dtype(self) -> np.dtype:
        if self.dtype == "bfloat16":
            import ml_dtypes  # only bf16 slots need it, and it is slow to import

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self.dtype)


@dataclass
class SlotManifest:
    """All slots of an injected model, plus the adapter modules that do not occur in its graph."""

    slots: dict[str, Slot]
    absent: list[str] = field(default_factory=list)
    vera: dict | None = None  # VeRA vector slots: the shared projections' key, r, sizes and sha256

    def to_json(self) -> str:
        # Fields at their defaults stay out, so models injected before VeRA keep their manifest bytes.
        slots = [
            {k: v for k, v in asdict(s).items() if k not in ("vera", "packed") or v}
            for _, s in sorted(self.slots.items())
        ]
        raw = {"version": SLOTS_VERSION, "slots": slots, "absent": sorted(self.absent)}
        if self.vera is not None:
            raw["vera"] = self.vera
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> SlotManifest:
        if not text:
            raise ModelError("not an injected model: no lora_export.slots metadata (run `lora-export inject`)")
        try:
            raw = safejson.loads(text)
            slots = {d["module"]: Slot(**d) for d in raw["slots"]}
            # Inside the try: a malformed "absent" is as corrupt as a malformed slot.
            absent = raw.get("absent", [])
            if not isinstance(absent, list) or not all(isinstance(m, str) for m in absent):
                raise TypeError("absent must be a list of module names")
            vera = raw.get("vera")
            if vera is not None and not vera_entry_ok(vera):
                raise TypeError("vera must describe the shared projections")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"corrupt lora_export.slots metadata ({type(e).__name__})") from None
        for slot in slots.values():
            problem = slot_problem(slot)
            if problem:
                raise ModelError(
                    f"corrupt lora_export.slots metadata (slot {safejson.short_repr(slot.module)}: {problem})"
                )
        if any(s.vera for s in slots.values()) != (vera is not None):
            raise ModelError("corrupt lora_export.slots metadata (VeRA slots without their projections)")
        problem = sharing_problem(slots)
        if problem:
            raise ModelError(f"corrupt lora_export.slots metadata ({problem})")
        return cls(slots, absent, vera)

    @property
    def fingerprint(self) -> int:
        """A 31-bit id of the slot layout, stored as the .onnx_adapter model version."""
        return zlib.crc32(self.to_json().encode()) & 0x7FFFFFFF

    def input_names(self) -> dict[str, Slot]:
        """Slot by input name (for an input several slots share, one of them: they agree in shapes)."""
        return {name: s for s in self.slots.values() for name in s.inputs}

    def sharing(self) -> dict[str, list[str]]:
        """A/B input name → the modules that read it, for inputs read by more than one slot (a shared LoRA;
        packed groups: ``packed_groups``)."""
        readers: dict[str, list[str]] = {}
        for s in self.slots.values():
            if s.packed is None:
                readers.setdefault(s.a, []).append(s.module)
        return {name: sorted(ms) for name, ms in readers.items() if len(ms) > 1}

    def packed_groups(self) -> dict[str, list[Slot]]:
        """A_cat input name → the slots of that packed op, by offset (only slots with ``packed``)."""
        groups: dict[str, list[Slot]] = {}
        for s in self.slots.values():
            if s.packed is not None:
                groups.setdefault(s.a, []).append(s)
        return {a: sorted(ss, key=lambda s: s.packed[0]) for a, ss in groups.items()}


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
    spans: dict[str, list[tuple[int, int]]] = {}
    for s in slots.values():
        if s.packed is not None:
            spans.setdefault(s.a, []).append((s.packed[0], s.packed[0] + s.weight_shape[0]))
    for name, ranges in spans.items():
        ranges.sort()
        if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
            return f"packed slots of {safejson.short_repr(name)} overlap"
    roles = [n for s in slots.values() for n in (s.dora,) if n] + list(by_input)
    if len(roles) != len(set(roles)) or any(s.a == s.b for s in slots.values()):
        return "an input name serves two roles"
    return None


def _pair_key(s: Slot) -> tuple:
    if s.packed is not None:  # one packed op's slots: same input width and packed width, each its own columns
        return ("packed", s.a, s.b, s.weight_shape[1], s.packed[1], s.dtype)
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
    if slot.packed is not None:
        p = slot.packed
        ok = isinstance(p, list) and len(p) == 2 and all(type(d) is int for d in p)
        if not ok or p[0] < 0 or p[0] + ws[0] > p[1] or slot.kind != "linear" or slot.dora or slot.vera:
            return "packed is not [offset, total] of a linear slot's columns"
    if not floating_dtype(slot):
        return f"unsupported dtype {safejson.short_repr(slot.dtype)}"
    return None


def floating_dtype(slot: Slot) -> bool:
    """Whether the slot's dtype is a floating-point type numpy knows (bfloat16 included)."""
    try:
        return slot.dtype == "bfloat16" or slot.np_dtype.kind == "f"
    except TypeError:  # a dtype numpy does not know (float8 and other ml_dtypes names)
        return False

"""A packed op's slots as one concatenated pair of inputs: A_cat (in, Σr) and the block-diagonal B_cat (Σr, total).

The slots of one packed projection (the q, k and v slices of a fused ``qkv_proj``) read the two inputs
``<group>.lora_A`` = [A′_1 | … | A′_n] and ``<group>.lora_B``, whose row block i holds B′_i (scale folded in)
in slot i's columns [offset_i, offset_i + out_i) and zeros elsewhere, so

    (x·A_cat)·B_cat = Σᵢ (x·A′ᵢ)·Pad(B′ᵢ)

exactly: the zero blocks add exact zeros, whatever the ranks and for parts an adapter does not target (rank 0,
no rows at all). The branch is the op's own: MatMul(x, A_cat) → MatMul(·, B_cat) → Add (MatMulNBits: the
Add after the quantized op's float output), three ops per packed op at any opset, with no per-call Pad or
Concat (each op costs ~4–8 µs at a one-token decode step whatever its size; figures: README, packed branch).
The manifest marks such slots (``Slot.packed`` = [offset, total]); models injected before have one pair per
slot and keep their branches (``graph.ops.packed_branch``). DoRA (refused on packed slices), VeRA and shared
(LoRA-drop) slots keep the per-slot form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ..model.slot_manifest import Slot, SlotManifest
from ..ops.packed import PackedSlice
from ..ops.packed_branch import group_stem


def cat_plan(chosen: Mapping, stems: Mapping[str, str], dora_modules: set[str]) -> dict[str, dict]:
    """module → the ``Slot`` fields (a, b, packed) of the packed targets that take the concatenated form.

    ``chosen``: module → its resolved target (``layout``, ``nodes``). A packed op takes it when every slot on
    it is a plain one: a ``PackedSlice`` applied by that one node, not DoRA, not in a shared group."""
    by_node: dict[int, list[str]] = {}
    for module, rt in chosen.items():
        if isinstance(rt.layout, PackedSlice):
            for node in rt.nodes:
                by_node.setdefault(id(node), []).append(module)
    out: dict[str, dict] = {}
    for modules in by_node.values():
        rts = [chosen[m] for m in modules]
        plain = all(len(rt.nodes) == 1 and m not in dora_modules and stems[m] == m for m, rt in zip(modules, rts))
        if not plain or len({type(rt.layout.inner) for rt in rts}) != 1:
            continue
        modules = sorted(modules, key=lambda m: chosen[m].layout.offset)
        stem = group_stem(modules)
        node = rts[0].nodes[0]
        for m in modules:
            layout = chosen[m].layout
            out[m] = {"a": f"{stem}.lora_A", "b": f"{stem}.lora_B", "packed": [layout.offset, layout.total(node)]}
    return out


def module_view(slot: Slot) -> Slot:
    """``slot`` as if it had its own pair (``<module>.lora_A`` (in, r), ``.lora_B`` (r, out)): the shapes one
    target's A′ and B′ take before they are placed in the group's A_cat and B_cat."""
    return dataclasses.replace(slot, a=f"{slot.module}.lora_A", b=f"{slot.module}.lora_B", packed=None)


def cat_tensors(manifest: SlotManifest, parts: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A_cat and B_cat of every packed group that ``parts`` (module → its ``module_view`` tensors) fills at
    least in part; a slot without tensors is rank 0 there (no columns of A_cat, no rows of B_cat)."""
    out: dict[str, np.ndarray] = {}
    for _, slots in sorted(manifest.packed_groups().items()):
        present = [(s, parts[s.module]) for s in slots if s.module in parts]
        if not present:
            continue
        first = slots[0]
        views = [(s, t, module_view(s)) for s, t in present]
        a_cat = np.concatenate([t[v.a] for _, t, v in views], axis=1)
        b_cat = np.zeros((a_cat.shape[1], first.packed[1]), first.np_dtype)
        row = 0
        for s, t, v in views:
            b = t[v.b]
            b_cat[row : row + b.shape[0], s.packed[0] : s.packed[0] + b.shape[1]] = b
            row += b.shape[0]
        out[first.a], out[first.b] = np.ascontiguousarray(a_cat), b_cat
    return out

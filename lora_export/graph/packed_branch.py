"""One LoRA branch per packed op: the q, k and v slots of one packed weight share a single side branch.

Per slice, a branch ``(x·A′)·Pad(B′)`` with its own full-width Add costs two MatMuls, a Pad and an Add per
part, which at a decode step (one token) weigh mostly as op dispatch, and run at rank 0 too. Grouped::

    y = op(x) + (x·A_cat)·B_cat,   A_cat = Concat(A′_1, …, A′_n; axis 1)            (in, r_1 + … + r_n)
                                   B_cat = Concat(Pad(B′_1), …, Pad(B′_n); axis 0)  (r_1 + … + r_n, total)

B_cat is block diagonal: row block i holds B′_i in its slice's columns and zeros elsewhere, so
(x·A_cat)·B_cat = Σᵢ (x·A′ᵢ)·Pad(B′ᵢ), each part landing in its own columns; the zero blocks add exact zeros.
Each part keeps its slot inputs (names, shapes, its own symbolic rank), so adapter files, ``convert`` and
``LoraSession`` see the same slots; ranks may differ and any part may be at rank 0. With every part at rank
0 the product is a zero (…, total) tensor and y = op(x) bit for bit (still one full-width Add: without
control flow nothing cheaper is exact; ``LoraSession(base_session=True)`` serves no-adapter runs branch-free).

The packed op's own layout places the branch (``OpLayout.add_branch`` with the concatenated A′ and B′): a
plain or quantized MatMul/Gemm adds it to the output, ONNX Runtime's fused ``Attention`` (a plugin) to its
effective weight. ``runtime.base_path`` strips the group again.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from ..errors import ModelError
from .packed import PackedSlice, slot_stem

Part = tuple[PackedSlice, ir.Value, ir.Value, "ir.Value | None"]  # (slice layout, A′, B′, DoRA g)


def group_stem(stems: Sequence[str]) -> str:
    """``model.layers.0.self_attn.q_proj+v_proj`` for the stems of one group: their common dotted prefix,
    then each stem's rest joined by ``+`` (never a slot's own stem, so no name clashes with slot inputs)."""
    heads = [s.split(".") for s in stems]
    common = 0
    while all(len(h) > common + 1 for h in heads) and len({tuple(h[: common + 1]) for h in heads}) == 1:
        common += 1
    rests = "+".join(".".join(h[common:]) for h in heads)
    return ".".join(heads[0][:common] + [rests])


def add_packed_branch(graph: ir.Graph, node: ir.Node, parts: Sequence[Part]) -> None:
    """Give ``node`` one branch for all its packed slots ``parts`` (see the module docstring); one part
    gets the slice's own ``(x·A′)·Pad(B′)``."""
    parts = sorted(parts, key=lambda p: p[0].offset)
    for layout, a, _, g in parts:
        if g is not None:
            layout.refuse_dora(node, slot_stem(a))
    if len(parts) == 1:
        layout, a, b, _ = parts[0]
        layout.add_branch(graph, node, a, b, None)
        return
    inners = {type(p[0].inner) for p in parts}
    if len(inners) != 1:  # one node has one layout: never expected, refused rather than guessed
        raise ModelError(f"{node.name or node.op_type}: its packed slices resolved to different op layouts")
    stems = [slot_stem(a) for _, a, _, _ in parts]
    stem = group_stem(stems)
    pads = [layout.padded_b(graph, node, b, s) for (layout, _, b, _), s in zip(parts, stems, strict=True)]
    a_cat = ir.node("Concat", [a for _, a, _, _ in parts], attributes={"axis": 1}, name=f"{stem}/packed_concat_A")
    a_cat.outputs[0].name = f"{stem}.lora_A"  # the branch's names derive from this stem (branches._prefix)
    b_cat = ir.node("Concat", [p.outputs[0] for p in pads], attributes={"axis": 0}, name=f"{stem}/packed_concat_B")
    b_cat.outputs[0].name = f"{stem}/packed_B"
    node.graph.insert_before(node, [a_cat, *pads, b_cat])
    parts[0][0].inner.add_branch(graph, node, a_cat.outputs[0], b_cat.outputs[0], None)

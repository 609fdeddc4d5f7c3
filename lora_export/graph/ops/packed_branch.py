"""One LoRA branch per packed op over per-slot inputs: the q, k and v slots of one packed weight, each with
its own A′/B′ inputs, share a single side branch. Since ``slots.packed_cat`` inject gives plain slots one
concatenated A_cat/B_cat pair instead (three ops, no Pad or Concat); this form serves models injected before
that (theirs stay as written), ``packed_cat=False``, and DoRA/shared slots (DoRA is refused here).

Per slice, a branch ``(x·A′)·Pad(B′)`` with its own full-width Add costs two MatMuls, a Pad of B′ and a
full-width Add per part, at rank 0 too. Grouped, one of two forms; each slot keeps its inputs (names, shapes,
its own symbolic rank), so adapter files, ``convert`` and ``LoraSession`` see the same slots:

- deltas side by side, on an op whose branch reads its input (MatMul, Gemm, MatMulNBits:
  ``OpLayout.output_branch``): y = op(x) + Concat(d_1, …, d_n; last axis), d_i = (x·A′_i)·B′_i, each slot's
  own branch; columns no slot covers (k's, for a q/v adapter) are zeros padded onto the neighbouring delta
  (``Pad`` with ``axes``, opset ≥ 18; without it only slots tiling the whole width take this form);
- otherwise (ONNX Runtime's fused ``Attention``, whose layout adds A′·B′ to its effective weight; opset < 18
  with a gap): the op's own branch with A_cat = Concat(A′_1, …, A′_n; axis 1) (in, Σr) and the block-diagonal
  B_cat = Concat(Pad(B′_1), …, Pad(B′_n); axis 0) (Σr, total): row block i holds B′_i in its slice's
  columns, so (x·A_cat)·B_cat = Σᵢ (x·A′ᵢ)·Pad(B′ᵢ); the zero blocks add exact zeros.

Why the first form where it can: at a decode step (one token) each op costs a few µs whatever its size and
the weight-side copies (Pad/Concat of B′, Concat of A′, run per call since they are inputs) cost more, so
one-token steps favour the form that copies no weights; a long prompt favours the block-diagonal form's
single x·A′ MatMul (figures: README, onnxruntime-genai benchmark). Ranks may differ and any part may be at rank
0. With every part at rank 0 the delta is a zero (…, total) tensor and y = op(x) bit for bit, still at the
cost of the branch's ops (no exact cheaper form without control flow: ``LoraSession(base_session=True)``
serves no-adapter runs branch-free). ``runtime.base_path`` strips either form again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from lora_export.errors import ModelError

from .branches import _const, _finish, _prefix
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
    inner, total = parts[0][0].inner, parts[0][0].total(node)
    ends = [p[0].offset + p[0].width for p in parts]
    tiled = [p[0].offset for p in parts] == [0, *ends[:-1]] and ends[-1] == total
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0))
    if inner.output_branch and not inner.packed_weight and (tiled or opset >= 18):  # gaps: Pad with ``axes``
        _concat_deltas(graph, node, parts, stem, total)
        return
    pads = [layout.padded_b(graph, node, b, s) for (layout, _, b, _), s in zip(parts, stems, strict=True)]
    a_cat = ir.node("Concat", [a for _, a, _, _ in parts], attributes={"axis": 1}, name=f"{stem}/packed_concat_A")
    a_cat.outputs[0].name = f"{stem}.lora_A"  # the branch's names derive from this stem (branches._prefix)
    b_cat = ir.node("Concat", [p.outputs[0] for p in pads], attributes={"axis": 0}, name=f"{stem}/packed_concat_B")
    b_cat.outputs[0].name = f"{stem}/packed_B"
    node.graph.insert_before(node, [a_cat, *pads, b_cat])
    inner.add_branch(graph, node, a_cat.outputs[0], b_cat.outputs[0], None)


def _concat_deltas(graph: ir.Graph, node: ir.Node, parts: Sequence[Part], stem: str, total: int) -> None:
    """y = op(x) + α·Concat(d_1, …, d_n; last axis), d_i = (x·A′_i)·B′_i, each padded with the zero columns
    before it (and after the last) that no slot covers."""
    prefix = _prefix(graph, node, ir.Value(name=f"{stem}.lora_A"))
    x = node.inputs[0]
    nodes, deltas, at = [], [], 0
    for i, (layout, a, b, _) in enumerate(parts):
        h = ir.node("MatMul", [x, a], name=f"{prefix}/lora_A.{i}")
        d = ir.node("MatMul", [h.outputs[0], b], name=f"{prefix}/lora_B.{i}")
        nodes += [h, d]
        before = layout.offset - at
        at = layout.offset + layout.width
        after = total - at if i == len(parts) - 1 else 0
        if before or after:  # columns no slot covers: zeros, padded onto the (…, width) delta, not onto B′
            pads = _const(graph, f"{prefix}.pads{i}", np.array([before, after], dtype=np.int64))
            axes = _const(graph, f"{prefix}.last_axis", np.array([-1], dtype=np.int64))
            pad = ir.node("Pad", [d.outputs[0], pads, None, axes], name=f"{prefix}/pad.{i}")
            nodes.append(pad)
            d = pad
        deltas.append(d.outputs[0])
    cat = ir.node("Concat", deltas, attributes={"axis": -1}, name=f"{prefix}/concat")
    nodes.append(cat)
    delta = cat.outputs[0]
    alpha = node.attributes.get("alpha")
    if alpha is not None and alpha.as_float() != 1.0:  # Gemm: α·x·W
        dtype = parts[0][0].activation_dtype(node).numpy()
        mul = ir.node("Mul", [delta, _const(graph, f"{prefix}.alpha", np.array(alpha.as_float(), dtype=dtype))])
        mul.name = f"{prefix}/alpha"
        nodes.append(mul)
        delta = mul.outputs[0]
    _finish(graph, node, node.outputs[0], delta, nodes, None, None, None, prefix)

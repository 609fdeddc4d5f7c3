"""Targets in onnxruntime-genai builder models, by the names the builder gives (no ``--base-weights``).

The builder (``onnxruntime_genai.models.builder``, checked against 0.18.0) names every decoder layer's
nodes ``/model/layers.{i}/attn/...`` and ``/model/layers.{i}/mlp/...`` whatever the Hugging Face module
names, writes ``genai_config.json`` beside the model, and records ``producer_name = "onnxruntime-genai"``:

  PEFT module path (``model.`` prefix)   builder node                          weight
  ``layers.{i}.self_attn.{q,k,v}_proj``   ``/model/layers.{i}/attn/qkv_proj/MatMul`` (int4: ``..._Q4``)
                                          rows [0, q), [q, q+kv), [q+kv, q+2kv) of the packed N, where
                                          q = num_attention_heads·head_size, kv = num_key_value_heads·head_size
                                          (or ``attn/{q,k,v}_proj/MatMul`` when the builder did not pack)
  ``layers.{i}.self_attn.qkv_proj``       the whole ``attn/qkv_proj`` (Phi-3's own packed module)
  ``layers.{i}.self_attn.o_proj``         ``/model/layers.{i}/attn/o_proj/MatMul``
  ``layers.{i}.mlp.{gate,up}_proj``       ``mlp/{gate,up}_proj/MatMul``, or with ``fuse_mlp_gate_up``
                                          rows [0, N/2), [N/2, N) of ``mlp/gate_up_proj/MatMul``
                                          (the builder concatenates gate then up, both (intermediate, hidden))
  ``mlp.down_proj``, ``lm_head``, ``embed_tokens``: the builder's names already are the module paths.

The slice widths must be proven: from ``genai_config.json`` beside the model (q + 2·kv must be the packed
width), or without it only when the adapter's own q, k and v targets of that layer sum to the packed width.
Otherwise the target is unmatched, with one line saying to pass ``--base-weights`` or to keep
``genai_config.json`` beside the model; an adapter whose shapes disagree with the proven widths is refused
as a shape mismatch. A slice is never guessed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from lora_export import safejson
from lora_export.files.beside_model import outside_reason

from ..match.module_paths import strip_wrappers
from ..ops.layouts import OpLayout
from ..ops.packed import PackedSlice, packable
from ..ops.packed_quant import QuantPackedSlice, quant_packable

PRODUCER = "onnxruntime-genai"
CONFIG_NAME = "genai_config.json"
STRATEGY = "genai-name"
_TARGET = re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
_NO_PROOF = "pass --base-weights, or keep the builder's genai_config.json beside the model"


@dataclass(frozen=True)
class GenaiDims:
    """The attention widths genai_config.json states: q = heads·head_size, kv = kv_heads·head_size."""

    q: int
    kv: int


def read_genai_config(model_path: str | os.PathLike) -> GenaiDims | None:
    """The decoder's attention widths from ``genai_config.json`` beside the model, or None when the file
    is absent, unreadable or lacks them (then nothing is proven by it)."""
    path = Path(model_path).parent / CONFIG_NAME
    # A link out of the model's folders proves nothing (ONNX Runtime's rule for what a model may read).
    if outside_reason(model_path, CONFIG_NAME) is not None:
        return None
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        data = safejson.loads(path.read_text(encoding="utf-8"))
        dec = data["model"]["decoder"]
        nh, nkv, hd = (dec[k] for k in ("num_attention_heads", "num_key_value_heads", "head_size"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (nh, nkv, hd)):
        return None
    return GenaiDims(nh * hd, nkv * hd)


def is_genai(model: ir.Model, dims: GenaiDims | None) -> bool:
    """Whether the builder's naming applies: it made the model, or its config lies beside it."""
    return dims is not None or (model.producer_name or "") == PRODUCER


def _builder_paths(layer: str, group: str, name: str) -> list[tuple[str, int | None]]:
    """(graph module path, slice index or None for the whole weight) in order of preference."""
    if group == "self_attn":
        if name in ("q_proj", "k_proj", "v_proj"):
            packed = f"model.layers.{layer}.attn.qkv_proj"
            return [(f"model.layers.{layer}.attn.{name}", None), (packed, "qkv".index(name[0]))]
        if name in ("o_proj", "qkv_proj"):
            return [(f"model.layers.{layer}.attn.{name}", None)]
    elif name in ("gate_proj", "up_proj"):
        return [(f"model.layers.{layer}.mlp.gate_up_proj", ("gate_proj", "up_proj").index(name))]
    return []


def _widths(t, total: int, part: int, dims: GenaiDims | None, adapter_shapes) -> list[int] | str:
    """The proven part widths of a packed weight of ``total`` rows, or why they are not proven."""
    if t.name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj"):
        return [total // 2, total // 2] if total % 2 == 0 else f"its packed gate_up width {total} is odd"
    if dims is not None:
        widths = [dims.q, dims.kv, dims.kv]
        if sum(widths) != total:
            return f"{CONFIG_NAME} gives q/k/v widths {widths} but the packed weight has {total} rows; {_NO_PROOF}"
        return widths
    prefix = t.name[: -len(t.name.rsplit(".", 1)[-1])]
    own = [adapter_shapes.get(f"{prefix}{p}_proj") for p in "qkv"]
    if None not in own and sum(own) == total:
        return own
    return f"the q/k/v widths of its packed weight ({total} rows) are not proven; {_NO_PROOF}"


def by_genai_names(g, t, dims: GenaiDims | None, adapter_shapes: dict[str, int]):
    """((value, node, layout, why, graph path) or None, found shape or None, why not), for the resolver.

    ``g`` is the resolver's graph index; ``adapter_shapes`` maps the adapter's target names to their widths."""
    m = _TARGET.match(strip_wrappers(t.name))
    if m is None or t.kind != "linear":
        return None, None, ""
    layer, group, name = m.groups()
    for path, part in _builder_paths(layer, group, name):
        hits = [(n, lay, v) for v in g.by_node_name.get(path, []) for n, lay in g.uses(v) if lay.kind == "linear"]
        if not hits:
            continue
        if len(hits) != 1:
            return None, None, f"builder name {path!r} holds {len(hits)} weights"
        node, layout, value = hits[0]
        shape = layout.weight_shape(node)
        if shape is None:
            return None, None, f"{node.name!r}: unreadable weight"
        if part is None:
            if tuple(shape) != tuple(t.weight_shape):
                return None, tuple(shape), ""
            return (value, node, layout, f"onnxruntime-genai name {node.name!r}", path), None, ""
        widths = _widths(t, shape[0], part, dims, adapter_shapes)
        if isinstance(widths, str):
            return None, None, f"{node.name!r}: {widths}"
        off, width = sum(widths[:part]), widths[part]
        if (width, shape[1]) != tuple(t.weight_shape):
            return None, (width, shape[1]), ""
        slice_layout = _slice(layout, off, width)
        if slice_layout is None:
            return None, None, f"{node.name!r}: {layout.op_type} cannot hold a packed slice"
        why = f"onnxruntime-genai name {node.name!r} rows [{off}:{off + width}] of {shape[0]}"
        return (value, node, slice_layout, why, path), None, ""
    return None, None, ""


def _slice(layout: OpLayout, offset: int, width: int) -> PackedSlice | None:
    if packable(layout):
        return PackedSlice(layout, offset, width)
    if quant_packable(layout):
        return QuantPackedSlice(layout, offset, width)
    return None

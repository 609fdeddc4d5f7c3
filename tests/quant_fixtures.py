"""A tiny LLaMA in the onnxruntime-genai builder's layout, float and int4: q/k/v packed into one
``/model/layers.N/attn/qkv_proj/MatMul`` (and optionally gate/up into ``mlp/gate_up_proj``) by
concatenation along N before quantization, as the builder does; then ONNX Runtime's own
``MatMulNBitsQuantizer`` (block 16) makes every MatMul a ``MatMulNBits`` named ``..._Q4``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from lora_export.graph.match.module_paths import name_module_paths
from lora_export.graph.ops.layouts import get_layout

BLOCK = 16
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
GROUPS = {"attn/qkv_proj": ("self_attn", QKV), "mlp/gate_up_proj": ("mlp", GATE_UP)}


def pack(src: Path, dst: Path, *, gate_up: bool = False, order: tuple[str, ...] = QKV) -> Path:
    """Rewrite each layer's q/k/v MatMuls (weights (in, out)) into one packed MatMul, the parts
    concatenated along N in ``order`` (the builder's is q, k, v), then a Split; with ``gate_up`` also
    gate/up into ``mlp/gate_up_proj``."""
    model = ir.load(str(src))
    graph = model.graph
    groups = {"attn/qkv_proj": ("self_attn", order)}
    if gate_up:
        groups["mlp/gate_up_proj"] = GROUPS["mlp/gate_up_proj"]
    for packed_name, (scope, parts) in groups.items():
        layers: dict[str, dict[str, ir.Node]] = {}
        for node in graph:
            for p in parts:
                if node.op_type == "MatMul" and node.name.endswith(f"{scope}/{p}/MatMul"):
                    layers.setdefault(node.name.split("/layers.")[1].split("/")[0], {})[p] = node
        assert layers
        for n, found in sorted(layers.items()):
            nodes = [found[p] for p in parts]
            x = nodes[0].inputs[0]
            assert all(m.inputs[0] is x for m in nodes)
            weights = [m.inputs[1] for m in nodes]
            name = f"model.layers.{n}.{packed_name.replace('/', '.')}.MatMul.weight"
            w = ir.Value(name=name, const_value=ir.tensor(np.concatenate([v.const_value.numpy() for v in weights], 1)))
            graph.register_initializer(w)
            sizes = np.array([int(v.const_value.shape[1]) for v in weights], np.int64)
            split = ir.Value(name=f"{name}.split", const_value=ir.tensor(sizes, name=f"{name}.split"))
            graph.register_initializer(split)
            mm = ir.node("MatMul", [x, w], name=f"/model/layers.{n}/{packed_name}/MatMul")
            sp = ir.node("Split", [mm.outputs[0], split], attributes={"axis": -1}, num_outputs=len(parts))
            sp.name = f"/model/layers.{n}/{packed_name}/Split"
            graph.insert_before(nodes[0], [mm, sp])
            for old, new in zip(nodes, sp.outputs, strict=True):
                old.outputs[0].replace_all_uses_with(new)
                graph.remove(old, safe=True)
            for v in weights:
                del graph.initializers[v.name]
    ir.save(model, str(dst))
    return dst


def quantize(src: Path, dst: Path, symmetric: bool = True) -> Path:
    """ONNX Runtime's MatMulNBitsQuantizer (int4, block 16) on every MatMul of ``src``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=BLOCK, is_symmetric=symmetric)
    q.process()
    q.model.save_model_to_file(str(dst))
    return dst


def genai_config(folder: Path, heads: int = 4, kv_heads: int = 2, head_size: int = 8, hidden: int = 32) -> Path:
    """The decoder part of the builder's genai_config.json, beside the model."""
    dec = {"head_size": head_size, "hidden_size": hidden, "num_attention_heads": heads}
    dec["num_key_value_heads"] = kv_heads
    path = folder / "genai_config.json"
    path.write_text(json.dumps({"model": {"decoder": dec, "type": "llama"}}))
    return path


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    segs = path.split(".")
    while segs:
        try:
            return model.get_submodule(".".join(segs))
        except AttributeError:
            segs = segs[1:]
    raise AssertionError(path)


def dequantized_torch(base: torch.nn.Module, path: Path, order: tuple[str, ...] = QKV) -> torch.nn.Module:
    """``base`` with every Linear the ONNX file quantized set to its dequantized weight (the QLoRA base);
    packed weights are split by the module widths, in ``order``."""
    model = copy.deepcopy(base)
    for node in ir.load(str(path)).graph:
        if node.op_type != "MatMulNBits":
            continue
        w = torch.from_numpy(get_layout(node).read(node))
        mod = name_module_paths(node)[0]
        scope, parts = next(((s, p) for k, (s, p) in GROUPS.items() if mod.endswith(k.replace("/", "."))), (None, None))
        if scope is None:
            targets = [(_module(model, mod), w)]
        else:
            layer = mod.split(".layers.")[1].split(".")[0]
            parts = order if scope == "self_attn" else parts
            linears = [model.get_submodule(f"model.layers.{layer}.{scope}.{p}") for p in parts]
            cuts = np.cumsum([0] + [m.weight.shape[0] for m in linears])
            targets = [(m, w[a:b]) for m, a, b in zip(linears, cuts[:-1], cuts[1:], strict=True)]
        with torch.no_grad():
            for linear, weight in targets:
                assert linear.weight.shape == weight.shape
                linear.weight.copy_(weight)
    return model


def state_dict_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

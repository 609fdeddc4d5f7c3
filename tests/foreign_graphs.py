"""Graphs shaped like other tools' exports, made from plain torch exports with onnx edits.

- ``tie_lm_head``: Optimum's default post-processing for GPT-2 keeps one ``wte`` initializer feeding both
  the embedding Gather and lm_head's ``Transpose(wte)`` (tied weights), instead of a folded copy.
- ``wrap_in_if``: Optimum's ``decoder_model_merged.onnx`` keeps the weights in the top graph and runs one
  of two ``If`` branches (with / without past) that both read them.
- ``export_submodule``: an encoder exported on its own names its nodes ``/layers.0/self_attn/...``
  without the ``model.encoder.`` prefix of the adapter's module paths.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn


def tie_lm_head(path: Path, out: Path, table: str, head_node: str) -> Path:
    """Point ``head_node`` (a MatMul reading a folded copy of ``table``ᵀ) at ``Transpose(table)``."""
    model = ir.load(path)
    graph = model.graph
    wte = graph.initializers[table]
    head = next(n for n in graph if n.name == head_node)
    folded = head.inputs[1]
    w = wte.const_value.numpy()
    assert np.array_equal(folded.const_value.numpy(), w.T), "lm_head does not read the transposed table"
    tr = ir.node("Transpose", [wte], attributes={"perm": [1, 0]}, name=head_node.rsplit("/", 1)[0] + "/Transpose")
    graph.insert_before(head, tr)
    head.replace_input_with(1, tr.outputs[0])
    graph.initializers.pop(folded.name)
    ir.save(model, out)
    return out


def wrap_in_if(path: Path, out: Path, flag: str = "use_cache_branch") -> Path:
    """Both ``If`` branches run the whole original graph; initializers move to the top graph."""
    proto = onnx.load(str(path))
    g = proto.graph

    def branch(suffix: str) -> onnx.GraphProto:
        nodes = copy.deepcopy(list(g.node))
        inits = {i.name for i in g.initializer} | {i.name for i in g.input}
        rename = {o: o + suffix for n in nodes for o in n.output if o}
        for n in nodes:
            # Same node names in both branches, as Optimum's merger leaves them; values get unique names.
            n.input[:] = [rename.get(i, i) if i not in inits else i for i in n.input]
            n.output[:] = [rename[o] if o else o for o in n.output]
        outs = []
        for o in g.output:
            vi = copy.deepcopy(o)
            vi.name = rename.get(o.name, o.name)
            outs.append(vi)
        return onnx.helper.make_graph(nodes, f"branch{suffix}", [], outs)

    if_node = onnx.helper.make_node(
        "If",
        [flag],
        [o.name for o in g.output],
        name="optimum::if",
        then_branch=branch("_with_past"),
        else_branch=branch("_no_past"),
    )
    cond = onnx.helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, [])
    top = onnx.helper.make_graph([if_node], g.name, [*g.input, cond], list(g.output), initializer=list(g.initializer))
    merged = onnx.helper.make_model(top, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    onnx.save(merged, str(out))
    return out


def export_submodule(module: nn.Module, inputs: dict, out: Path) -> Path:
    """TorchScript export of a deepcopy of ``module`` alone (its own node names, no outer prefix)."""
    m = copy.deepcopy(module).eval()
    names = list(inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            tuple(inputs[n] for n in names),
            str(out),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamo=False,
            opset_version=17,
        )
    return out


def run_injected(model: Path, adapter_file: Path | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an injected model with plain ONNX Runtime, the adapter active through RunOptions (or none)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    if adapter_file is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_file))
        run_options.add_active_adapter(adapter)
    wanted = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in wanted}, run_options)


def run_plain(model: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_injected(model, None, feeds)


def packed_attention(attn: nn.Module, path: Path, prefix: str = "/attn", gemm: bool = False) -> Path:
    """The onnxruntime-genai builder's attention layout for a module with q/k/v/o ``nn.Linear`` (8 → 8):
    q/k/v packed into one ``<prefix>/qkv_proj`` MatMul (or Gemm transB=1, stored (out, in)), then Split,
    ``q·k + v``, and ``<prefix>/o_proj``. Input ``x`` (2, 8), output ``y``."""
    wqkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().numpy()
    wqkv = wqkv.copy() if gemm else wqkv.T.copy()
    wo = attn.o_proj.weight.detach().numpy().T.copy()
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    qkv_w = ir.Value(name="qkv_proj.MatMul.weight", const_value=ir.tensor(wqkv, name="qkv_proj.MatMul.weight"))
    o_w = ir.Value(name="o_proj.MatMul.weight", const_value=ir.tensor(wo, name="o_proj.MatMul.weight"))
    split = ir.Value(name="split", const_value=ir.tensor(np.array([8, 8, 8], dtype=np.int64), name="split"))
    if gemm:
        mm = ir.node("Gemm", [x, qkv_w], attributes={"transB": 1}, name=f"{prefix}/qkv_proj/Gemm")
    else:
        mm = ir.node("MatMul", [x, qkv_w], name=f"{prefix}/qkv_proj/MatMul")
    sp = ir.node("Split", [mm.outputs[0], split], attributes={"axis": -1}, num_outputs=3, name=f"{prefix}/Split")
    q, k, v = sp.outputs
    mul = ir.node("Mul", [q, k], name=f"{prefix}/Mul")
    add = ir.node("Add", [mul.outputs[0], v], name=f"{prefix}/Add")
    out = ir.node("MatMul", [add.outputs[0], o_w], name=f"{prefix}/o_proj/MatMul")
    out.outputs[0].name = "y"
    graph = ir.Graph(
        [x], out.outputs, nodes=[mm, sp, mul, add, out], initializers=[qkv_w, o_w, split], opset_imports={"": 18}
    )
    ir.save(ir.Model(graph, ir_version=10), path)
    return path

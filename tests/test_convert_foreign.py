"""convert for LoRA-input models made by other tools (Olive's ExtractAdapters, onnxruntime-genai's builder).

The graphs are built with onnx helpers the way those tools lay them out: LoRA inputs named
``<module>.lora_A[.default|.MatMul].weight``, A as (in, r) or (r, in) through a Transpose, B as (r, out) or
(out, r), optionally a Mul by the first adapter's scale kept in the graph (before or after B's MatMul), a
rank-0 default or none. The reference is PEFT on the same base weights, with an adapter of another rank and
alpha than the one the graph's scale came from.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import saved_peft_reference
from models import qv_model
from onnx import TensorProto, helper, numpy_helper

from lora_export import convert_adapter
from lora_export.cli import cli
from lora_export.errors import ModelError, ShapeError, TargetError
from lora_export.formats.adapter_files import read_adapter_tensors

TOL = 1e-5
D_IN, D_Q, D_V = 16, 16, 8
GRAPH_SCALE = 2.0  # the first adapter's alpha/r (8/4), as an exporter that keeps PEFT's Mul bakes it in


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The base, an adapter with r=6 and alpha=20 (scale 3.33, not the graph's 2.0), PEFT's outputs."""
    root = tmp_path_factory.mktemp("foreign")
    base = qv_model(D_IN, D_Q, D_V, seed=0).eval()
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(7))
    cfg = dict(r=6, lora_alpha=20, target_modules=["q_proj", "v_proj"])
    peft = saved_peft_reference(base, root / "r6a20", **cfg)
    q_only = saved_peft_reference(base, root / "q_only", r=3, lora_alpha=5, target_modules=["q_proj"])
    with torch.no_grad():
        refs = {"r6a20": peft(x).numpy(), "q_only": q_only(x).numpy(), "base": base(x).numpy()}
    return base, x.numpy(), refs, root


def _lora_graph(
    base: torch.nn.Module,
    path,
    *,
    naming=".default.weight",
    a_t=False,
    b_t=False,
    scale=None,
    where="out",
    rank="r",
    default="rank0",
    prefix="base_model.model.",
    attn="self_attn",
    scale_input=False,
    own_rank=False,
):
    """A graph like Olive's/genai's: y = x·Wᵀ (+ bias) + [s·](x·A)·B per module, A/B graph inputs."""
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D_IN])]
    outs = []
    attn_mod = base.model.layers[0].self_attn
    for proj, lin in (("q_proj", attn_mod.q_proj), ("v_proj", attn_mod.v_proj)):
        mod = f"{prefix}model.layers.0.{attn}.{proj}"
        out_f = lin.out_features
        w = f"{mod}.base.weight_t"
        inits.append(numpy_helper.from_array(lin.weight.detach().numpy().T.copy(), w))
        nodes.append(helper.make_node("MatMul", ["x", w], [f"{mod}/base"], name=f"/{mod}/MatMul"))
        base_out = f"{mod}/base"
        if lin.bias is not None:
            inits.append(numpy_helper.from_array(lin.bias.detach().numpy(), f"{mod}.bias"))
            nodes.append(helper.make_node("Add", [base_out, f"{mod}.bias"], [f"{mod}/biased"]))
            base_out = f"{mod}/biased"
        a, b = f"{mod}.lora_A{naming}", f"{mod}.lora_B{naming}"
        rank = f"{mod}.rank" if own_rank else rank
        a_shape, b_shape = [D_IN, rank], [rank, out_f]
        if a_t:
            a_shape = a_shape[::-1]
        if b_t:
            b_shape = b_shape[::-1]
        inputs += [
            helper.make_tensor_value_info(a, TensorProto.FLOAT, a_shape),
            helper.make_tensor_value_info(b, TensorProto.FLOAT, b_shape),
        ]
        if default != "none":
            r0 = 0 if default == "rank0" else rank
            for name, shp in ((a, a_shape), (b, b_shape)):
                inits.append(numpy_helper.from_array(np.zeros([r0 if d == rank else d for d in shp], np.float32), name))
        a_fed, b_fed = a, b
        if a_t:
            nodes.append(helper.make_node("Transpose", [a], [f"{a}/t"], perm=[1, 0]))
            a_fed = f"{a}/t"
        if b_t:
            nodes.append(helper.make_node("Transpose", [b], [f"{b}/t"]))
            b_fed = f"{b}/t"
        nodes.append(helper.make_node("MatMul", ["x", a_fed], [f"{mod}/h"]))
        h = f"{mod}/h"
        s_name = "graph_scale" if scale_input else f"{mod}/scale"
        if scale is not None and not scale_input:
            inits.append(numpy_helper.from_array(np.array(scale, np.float32), s_name))
        if scale is not None and where == "mid":
            nodes.append(helper.make_node("Mul", [s_name, h], [f"{mod}/hs"]))
            h = f"{mod}/hs"
        nodes.append(helper.make_node("MatMul", [h, b_fed], [f"{mod}/d"]))
        d = f"{mod}/d"
        if scale is not None and where == "out":
            nodes.append(helper.make_node("Mul", [d, s_name], [f"{mod}/ds"]))
            d = f"{mod}/ds"
        nodes.append(helper.make_node("Add", [base_out, d], [f"{mod}/y"]))
        outs.append(f"{mod}/y")
    if scale_input:
        inputs.append(helper.make_tensor_value_info("graph_scale", TensorProto.FLOAT, []))
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "graph_scale"))
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=-1))
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _run(model, x, adapter_file=None) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    ro = ort.RunOptions()
    if adapter_file is not None:
        ad = ort.LoraAdapter()
        ad.Load(str(adapter_file))
        ro.add_active_adapter(ad)
    return sess.run(None, {"x": x}, ro)[0]


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("naming", [".weight", ".default.weight", ".MatMul.weight"])
@pytest.mark.parametrize(
    ("a_t", "b_t", "scale", "where"),
    [
        (False, False, None, "out"),
        (False, False, GRAPH_SCALE, "out"),
        (True, True, GRAPH_SCALE, "mid"),
        (True, False, None, "out"),
        (False, True, 0.5, "out"),
    ],
)
def test_different_scale_adapter_gives_peft_outputs(case, tmp_path, naming, a_t, b_t, scale, where):
    base, x, refs, root = case
    model = _lora_graph(base, tmp_path / "m.onnx", naming=naming, a_t=a_t, b_t=b_t, scale=scale, where=where)
    out = tmp_path / "r6a20.onnx_adapter"
    report = convert_adapter(root / "r6a20", model, out)
    assert report["foreign"] and len(report["slots_filled"]) == 2
    assert set(report["graph_scales"].values()) == ({scale} if scale not in (None, 1.0) else set())
    assert _rel(_run(model, x, out), refs["r6a20"]) <= TOL
    # No adapter (the rank-0 defaults) is the base model.
    assert _rel(_run(model, x), refs["base"]) <= TOL
    # Without the scale correction the graph's 2.0 would apply instead of 20/6: the test can tell.
    assert _rel(refs["r6a20"], refs["base"]) > 0.1


def test_subset_adapter_writes_zeros_where_the_model_has_no_default(case, tmp_path):
    base, x, refs, root = case
    # Required inputs (no default) and a fixed rank of 4: q gets the rank-3 adapter padded, v gets zeros.
    model = _lora_graph(base, tmp_path / "m.onnx", rank=4, default="none", scale=GRAPH_SCALE)
    out = tmp_path / "q.safetensors"
    res = CliRunner().invoke(cli, ["convert", str(root / "q_only"), "--model", str(model), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["slots_zeroed"] == ["base_model.model.model.layers.0.self_attn.v_proj"]
    tensors = read_adapter_tensors(out)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape == (D_IN, 4)
    assert not tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"].any()
    # ORT's Python API checks required inputs before it applies an adapter: feed the tensors directly.
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    assert _rel(sess.run(None, {"x": x, **tensors})[0], refs["q_only"]) <= TOL
    v_proj = "base_model.model.model.layers.0.self_attn.v_proj"
    # Rank-0 defaults, one rank name for all slots (Olive's "lora_r": ORT holds it to one size per run):
    # the uncovered slot gets zeros of the adapter's rank.
    model0 = _lora_graph(base, tmp_path / "m0.onnx")
    assert convert_adapter(root / "q_only", model0, tmp_path / "q0.onnx_adapter")["slots_zeroed"] == [v_proj]
    assert _rel(_run(model0, x, tmp_path / "q0.onnx_adapter"), refs["q_only"]) <= TOL
    # A rank name per slot: the uncovered slot keeps its rank-0 default (left out of the file).
    model1 = _lora_graph(base, tmp_path / "m1.onnx", own_rank=True)
    assert convert_adapter(root / "q_only", model1, tmp_path / "q1.onnx_adapter")["slots_default"] == [v_proj]
    assert _rel(_run(model1, x, tmp_path / "q1.onnx_adapter"), refs["q_only"]) <= TOL


def test_genai_attn_naming_maps_to_self_attn(case, tmp_path):
    base, x, refs, root = case
    model = _lora_graph(base, tmp_path / "m.onnx", naming=".MatMul.weight", prefix="", attn="attn")
    out = tmp_path / "a.onnx_adapter"
    assert convert_adapter(root / "r6a20", model, out)["slots_filled"][0] == "model.layers.0.attn.q_proj"
    assert _rel(_run(model, x, out), refs["r6a20"]) <= TOL


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(scale=GRAPH_SCALE, scale_input=True), ModelError, "not a constant"),
        (dict(rank=4, default="none"), ShapeError, "exceeds the model's fixed rank 4"),
        (dict(scale=0.0), ModelError, "multiplies the branch by 0"),
    ],
)
def test_refusals(case, tmp_path, kwargs, error, words):
    base, _x, _refs, root = case
    model = _lora_graph(base, tmp_path / "m.onnx", **kwargs)
    out = tmp_path / "o.onnx_adapter"
    with pytest.raises(error, match=words):
        convert_adapter(root / "r6a20", model, out)
    assert not out.exists()
    res = CliRunner().invoke(cli, ["convert", str(root / "r6a20"), "--model", str(model), "-o", str(out)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


def _edit(path, fn):
    model = onnx.load(str(path))
    fn(model.graph)
    onnx.save(model, str(path))
    return path


def test_refuses_unknown_layouts_constants_and_ambiguity(case, tmp_path):
    base, _x, _refs, root = case
    out = tmp_path / "o.onnx_adapter"

    def a_as_left_operand(g):  # MatMul(A, x): not a layout any tool writes
        n = next(n for n in g.node if n.op_type == "MatMul" and n.input[1].endswith("q_proj.lora_A.default.weight"))
        n.input[0], n.input[1] = n.input[1], n.input[0]

    with pytest.raises(ModelError, match="unknown layout"):
        convert_adapter(root / "r6a20", _edit(_lora_graph(base, tmp_path / "a.onnx"), a_as_left_operand), out)

    def constants(g):  # LoRA weights baked in as initializers (the genai builder before ExtractAdapters)
        keep = [i for i in g.input if "lora" not in i.name]
        del g.input[:]
        g.input.extend(keep)

    with pytest.raises(ModelError, match="constant of the graph"):
        convert_adapter(root / "r6a20", _edit(_lora_graph(base, tmp_path / "c.onnx"), constants), out)
    # Module paths too short to say which layer: "self_attn.q_proj" in a model, an adapter on two layers.
    two_layers = qv_model(D_IN, D_Q, D_V, seed=0)
    two_layers.model.layers.append(qv_model(D_IN, D_Q, D_V, seed=1).model.layers[0])
    saved_peft_reference(two_layers, tmp_path / "two", r=2, lora_alpha=4, target_modules=["q_proj"])
    short = _lora_graph(base, tmp_path / "s.onnx", prefix="", attn="self_attn")

    def strip_layer(g):
        for coll in (g.input, g.initializer):
            for v in coll:
                v.name = v.name.replace("model.layers.0.", "")
        for n in g.node:
            n.input[:] = [i.replace("model.layers.0.", "") for i in n.input]
            n.output[:] = [o.replace("model.layers.0.", "") for o in n.output]

    with pytest.raises(TargetError, match="both map to"):
        convert_adapter(tmp_path / "two", _edit(short, strip_layer), out)
    # An int4 adapter input (genai builder + ExtractAdapters names them weight_Q4 / weight_scales).
    q4 = _lora_graph(base, tmp_path / "q4.onnx", naming=".MatMul.weight")

    def rename_q4(g):
        old = "q_proj.lora_A.MatMul.weight"
        for coll in (g.input, g.initializer):
            for v in coll:
                v.name = v.name.replace(old, old + "_Q4")
        for n in g.node:
            n.input[:] = [i.replace(old, old + "_Q4") for i in n.input]

    with pytest.raises(ModelError, match="int4"):
        convert_adapter(root / "r6a20", _edit(q4, rename_q4), out)
    assert not out.exists()

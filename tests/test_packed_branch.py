"""One LoRA branch per packed op (``graph.packed_branch``): the q/k/v slots of a packed ``qkv_proj`` (float
MatMul, or the builder's int4 MatMulNBits) share one (x·A_cat)·B_cat and one Add, whatever their ranks and
whichever parts an adapter has; exact against PEFT, the base bit for bit without adapter, and the twin
session strips the group again."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from conftest import output_of, peft_reference
from foreign_graphs import packed_attention, run_injected, run_plain
from inject_fixtures import REF_SEED, export_base, feeds_of
from models import tiny_llama
from onnx import version_converter
from quant_fixtures import QKV, dequantized_torch, pack, quantize, state_dict_of
from safetensors.numpy import save_file

from lora_export.errors import AdapterError, LoraExportError, ModelError
from lora_export.formats.adapter_files import read_adapter_tensors
from lora_export.formats.slot_adapter import adapter_from_slot_tensors
from lora_export.graph.model.slot_manifest import SLOTS_KEY, SlotManifest
from lora_export.graph.ops.packed_branch import group_stem
from lora_export.graph.verbs.convert import convert_adapter
from lora_export.graph.verbs.inject import inject_files
from lora_export.graph.verbs.inspect import inspect_model
from lora_export.runtime.session import LoraSession

ADAPTERS = {
    # q, k, v of three different ranks (and alphas), o_proj by name beside them.
    "ranks": dict(
        r=2,
        lora_alpha=4,
        rank_pattern={"k_proj": 3, "v_proj": 1},
        alpha_pattern={"v_proj": 5},
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}
# (packing order, opset): opset 18 has Pad with ``axes`` (deltas side by side, gaps padded); 17 does not (the
# block-diagonal form). The onnxruntime-genai builder writes opset 21+.
VARIANTS = {"fp32": (QKV, 17), "fp32-vqk": (("v_proj", "q_proj", "k_proj"), 18), "int4": (QKV, 18)}


@pytest.fixture(scope="module", autouse=True)
def plugin():
    from lora_export_plugins import int4

    int4.register()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_branch")
    base, make_inputs = tiny_llama()
    export_base(base, make_inputs(0), root / "plain.onnx")
    save_file(state_dict_of(base), str(root / "base.safetensors"))
    fresh = make_inputs(REF_SEED)
    out = {"root": root, "feeds": feeds_of(fresh), "variants": {}}
    for variant, (order, opset) in VARIANTS.items():
        path = root / f"{variant}.onnx"
        pack(root / "plain.onnx", path, order=order)
        if opset != 17:
            onnx.save(version_converter.convert_version(onnx.load(path), opset), path)
        torch_base = base
        if variant == "int4":
            quantize(path, path)
            torch_base = dequantized_torch(base, path)  # QLoRA: PEFT on the dequantized weights
        refs, adapters = {}, {}
        for i, (name, config) in enumerate(ADAPTERS.items()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = peft_reference(torch_base, seed=30 + i, **config)
                refs[name] = output_of(peft_model, fresh).numpy()
                adapters[name] = root / f"{variant}-{name}"
                peft_model.save_pretrained(str(adapters[name]))
        base_out = run_plain(path, out["feeds"])[0]
        out["variants"][variant] = dict(model=path, refs=refs, adapters=adapters, out=base_out)
    return out


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _packed_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if (n.name or "").endswith(("qkv_proj/MatMul", "qkv_proj/MatMul_Q4"))]


def _branch_adds(node: ir.Node) -> int:
    """How many Adds read the packed op's output (one per branch)."""
    return sum(u.node.op_type == "Add" for u in node.outputs[0].uses())


def _cat_branch(model: ir.Model, node: ir.Node, base_joins: int) -> None:
    """The packed op's branch is MatMul(x, A_cat) → MatMul(·, B_cat) → Add, over the group's two inputs, with
    no Pad or Concat anywhere (``slots.packed_cat``)."""
    add = next(u.node for u in node.outputs[0].uses() if u.node.op_type == "Add")
    b_op = add.inputs[1].producer()
    a_op = b_op.inputs[0].producer()
    assert (a_op.op_type, b_op.op_type) == ("MatMul", "MatMul") and a_op.inputs[0] is node.inputs[0]
    a_in, b_in = a_op.inputs[1], b_op.inputs[1]
    assert a_in in model.graph.inputs and b_in in model.graph.inputs
    assert a_in.name.endswith(".lora_A") and "_proj+" in a_in.name  # named after its slots, by offset
    total = node.attributes["N"].as_int() if node.op_type == "MatMulNBits" else node.inputs[1].shape[-1]
    assert a_in.shape[1] == b_in.shape[0] and b_in.shape[1] == total
    assert base_joins == len([n for n in model.graph if n.op_type in ("Pad", "Concat")])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("which", ["both", "qv"])
@pytest.mark.parametrize("form", ["cat", "split"])
def test_one_branch_per_packed_op_is_exact(case, tmp_path, variant, which, form):
    """``cat`` (the default): one A_cat/B_cat pair per packed op; ``split`` (``packed_cat=False``, the form of
    models injected before): a pair per slot, their deltas joined in the graph. Both exact."""
    v = case["variants"][variant]
    names = list(ADAPTERS) if which == "both" else ["qv"]
    out_dir = tmp_path / "inj"
    paths = [v["adapters"][n] for n in names]
    weights = case["root"] / "base.safetensors"
    inject_files(v["model"], paths, out_dir, base_weights=weights, names=names, packed_cat=form == "cat")
    model = ir.load(out_dir / "model.onnx")
    packed = _packed_nodes(model)
    assert len(packed) == 2  # one per layer
    joins = len([n for n in ir.load(v["model"]).graph if n.op_type in ("Pad", "Concat")])
    for node in packed:
        assert _branch_adds(node) == 1, node.name
        if form == "cat":
            _cat_branch(model, node, joins)
            continue
        add = next(u.node for u in node.outputs[0].uses() if u.node.op_type == "Add")
        delta = add.inputs[1].producer()
        if which == "both" or VARIANTS[variant][1] >= 18:  # each slot's delta side by side (k's columns: a Pad)
            assert delta.op_type == "Concat" and len(delta.inputs) == (3 if which == "both" else 2)
            padded = [d.producer() for d in delta.inputs if d.producer().op_type == "Pad"]
            assert len(padded) == (0 if which == "both" else 1)
        else:  # (x·A_cat)·B_cat: one MatMul reads x besides the op, B_cat stacks the two padded B′
            assert delta.op_type == "MatMul" and delta.inputs[1].producer().op_type == "Concat"
            assert sum(u.node.op_type == "MatMul" and u.node is not node for u in node.inputs[0].uses()) == 1
    # No adapter: the rank-0 defaults give the base model bit for bit.
    np.testing.assert_array_equal(run_plain(out_dir / "model.onnx", case["feeds"])[0], v["out"])
    for name in names:
        got = run_injected(out_dir / "model.onnx", out_dir / f"{name}.onnx_adapter", case["feeds"])[0]
        assert _rel(got, v["refs"][name]) <= 1e-5, name
        assert _rel(v["out"], v["refs"][name]) > 1e-3  # not vacuous


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("injected", ["ranks", "qv"])
def test_twin_session_strips_the_grouped_branch(case, tmp_path, variant, injected):
    """``base_session=True``: no adapter runs a branch-free twin (the base bit for bit, no slot inputs); an
    adapter (from its file, or a PEFT folder mapped in memory) still runs the grouped branch exactly."""
    v = case["variants"][variant]
    out_dir = tmp_path / "inj"
    paths = [v["adapters"][injected]]
    inject_files(v["model"], paths, out_dir, base_weights=case["root"] / "base.safetensors", names=[injected])
    sess = LoraSession(out_dir / "model.onnx", providers=["CPUExecutionProvider"], base_session=True)
    assert sess.base_session is not None
    assert not [i.name for i in sess.base_session.get_inputs() if ".lora_" in i.name]
    np.testing.assert_array_equal(sess.run(None, case["feeds"])[0], v["out"])
    sess.load_adapter(injected, out_dir / f"{injected}.onnx_adapter")
    if injected == "ranks":  # a q/v adapter fits the q/k/v slots too (mapped from its PEFT folder in memory)
        sess.load_adapter("qv", v["adapters"]["qv"])
    for name in ("ranks", "qv")[(injected == "qv") :]:
        assert _rel(sess.run(None, case["feeds"], adapter=name)[0], v["refs"][name]) <= 1e-5, name
    np.testing.assert_array_equal(sess.run(None, case["feeds"])[0], v["out"])


def test_group_stem_never_clashes_with_a_slot():
    stems = ["m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.v_proj"]
    assert group_stem(stems) == "m.layers.0.self_attn.q_proj+v_proj"
    assert group_stem(["a.q", "b.v"]) == "a.q+b.v"
    assert group_stem(["x.q", "x.q.y"]) == "x.q+q.y"


class _Attn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(8, 8, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm-transB"])
def test_tiling_slots_on_matmul_and_gemm(tmp_path, gemm):
    """q, k, v (ranks 1, 2, 3) on a packed MatMul or Gemm (stored (out, in)): one A_cat/B_cat branch (two
    MatMuls, no Pad or Concat), exact; the twin session is the base again."""
    torch.manual_seed(0)
    m = _Attn().eval()
    m_path = tmp_path / "model.onnx"
    packed_attention(m, m_path, gemm=gemm)
    save_file({k: t.detach().numpy().copy() for k, t in m.state_dict().items()}, str(tmp_path / "w.st"))
    config = dict(
        r=1, lora_alpha=2, rank_pattern={"k_proj": 2, "v_proj": 3}, target_modules=["q_proj", "k_proj", "v_proj"]
    )
    peft_model = peft_reference(m, seed=5, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    inj = tmp_path / "inj"
    inject_files(tmp_path / "model.onnx", [tmp_path / "adapter"], inj, base_weights=tmp_path / "w.st")
    model = ir.load(inj / "model.onnx")
    assert not [n for n in model.graph if n.op_type in ("Pad", "Concat")]
    assert sum(n.op_type == "MatMul" for n in model.graph) == 2 + sum(
        n.op_type == "MatMul" for n in ir.load(m_path).graph
    )
    x = {"x": torch.randn(2, 8).numpy()}
    ref = peft_model(torch.from_numpy(x["x"])).detach().numpy()
    assert _rel(run_injected(inj / "model.onnx", inj / "adapter.onnx_adapter", x)[0], ref) <= 1e-5
    base = run_plain(tmp_path / "model.onnx", x)[0]
    np.testing.assert_array_equal(run_plain(inj / "model.onnx", x)[0], base)
    sess = LoraSession(inj / "model.onnx", providers=["CPUExecutionProvider"], base_session=True)
    np.testing.assert_array_equal(sess.run(None, x)[0], base)


@pytest.mark.parametrize("variant", ["fp32", "int4"])
@pytest.mark.parametrize("form", ["cat", "split"])
def test_later_adapters_and_switching_in_both_forms(case, tmp_path, variant, form):
    """convert of a later adapter (other ranks, other parts) and LoraSession switching between adapters of
    different ranks, on the concatenated form and on the per-slot form of models injected before it (its
    manifest has no ``packed`` entries: read as it was written)."""
    v = case["variants"][variant]
    out_dir = tmp_path / "inj"
    weights = case["root"] / "base.safetensors"
    inject_files(
        v["model"], [v["adapters"]["ranks"]], out_dir, base_weights=weights, names=["ranks"], packed_cat=form == "cat"
    )
    model = out_dir / "model.onnx"
    raw = json.loads(ir.load(model).metadata_props[SLOTS_KEY])["slots"]
    packed = [s for s in raw if "packed" in s]
    assert len(packed) == (6 if form == "cat" else 0)  # q, k, v of two layers
    shown = [s.get("packed") for s in inspect_model(model)["slots"] if s["module"].endswith("0.self_attn.k_proj")]
    assert shown == ([{"offset": 32, "total": 64}] if form == "cat" else [None])
    late = tmp_path / "qv.onnx_adapter"
    convert_adapter(v["adapters"]["qv"], model, late)
    assert _rel(run_injected(model, late, case["feeds"])[0], v["refs"]["qv"]) <= 1e-5
    sess = LoraSession(model, providers=["CPUExecutionProvider"])
    sess.load_adapter("qv", late)
    sess.load_adapter("ranks", out_dir / "ranks.safetensors")
    for name in ("qv", "ranks", "qv"):
        assert _rel(sess.run(None, case["feeds"], adapter=name)[0], v["refs"][name]) <= 1e-5, name
    np.testing.assert_array_equal(sess.run(None, case["feeds"])[0], v["out"])
    if form == "cat":  # a file for the other form does not fit: named inputs of another layout
        with pytest.raises(AdapterError, match="packed projection"):  # nor serves on a plain base (MergedSession)
            adapter_from_slot_tensors(read_adapter_tensors(out_dir / "ranks.safetensors"), "ranks")
        with pytest.raises(LoraExportError):
            sess.load_adapter("old", {f"{s['module']}.lora_A": np.ones((32, 2), np.float32) for s in packed})


def _manifest(**slot) -> str:
    base = dict(kind="linear", op="MatMul", node="n", weight="w", weight_shape=[4, 8], dtype="float32")
    slots = [{**base, "module": m, "a": "g.lora_A", "b": "g.lora_B", **s} for m, s in slot.items()]
    return json.dumps({"version": 1, "slots": slots, "absent": []})


def test_packed_entries_are_checked_when_read():
    ok = SlotManifest.from_json(_manifest(q={"packed": [0, 12]}, v={"packed": [8, 12]}))
    assert [s.module for s in ok.packed_groups()["g.lora_A"]] == ["q", "v"]
    assert ok.slots["q"].b_shape(3) == [3, 12] and not ok.sharing() and not ok.slots["q"].shared
    for bad in (
        _manifest(q={"packed": [0, 12]}, v={"packed": [2, 12]}),  # overlapping columns
        _manifest(q={"packed": [10, 12]}),  # past the packed width
        _manifest(q={"packed": [0, 12]}, v={"packed": [8, 16]}),  # one pair, two widths
        _manifest(q={"packed": [0, 12]}, v={}),  # one pair, packed and not
        _manifest(q={"packed": [0]}),
        _manifest(q={"packed": [0, 12], "dora": "q.dora_scale"}),
    ):
        with pytest.raises(ModelError, match="corrupt"):
            SlotManifest.from_json(bad)

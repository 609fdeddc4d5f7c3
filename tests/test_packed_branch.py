"""One LoRA branch per packed op (``graph.packed_branch``): the q/k/v slots of a packed ``qkv_proj`` (float
MatMul, or the builder's int4 MatMulNBits) share one (x·A_cat)·B_cat and one Add, whatever their ranks and
whichever parts an adapter has; exact against PEFT, the base bit for bit without adapter, and the twin
session strips the group again."""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import pytest
from conftest import output_of, peft_reference
from foreign_graphs import run_injected, run_plain
from inject_fixtures import REF_SEED, export_base, feeds_of
from models import tiny_llama
from quant_fixtures import QKV, dequantized_torch, pack, quantize, state_dict_of
from safetensors.numpy import save_file

from lora_export.graph.inject import inject_files
from lora_export.graph.packed_branch import group_stem
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
VARIANTS = {"fp32": QKV, "fp32-vqk": ("v_proj", "q_proj", "k_proj"), "int4": QKV}


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
    for variant, order in VARIANTS.items():
        path = root / f"{variant}.onnx"
        pack(root / "plain.onnx", path, order=order)
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


def _branch_ops(model: ir.Model, node: ir.Node) -> tuple[int, int]:
    """(Adds reading the packed op's output, MatMuls other than the op reading its input x)."""
    adds = [u.node for u in node.outputs[0].uses() if u.node.op_type == "Add"]
    matmuls = [u.node for u in node.inputs[0].uses() if u.node.op_type == "MatMul" and u.node is not node]
    return len(adds), len(matmuls)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("which", ["both", "qv"])
def test_one_branch_per_packed_op_is_exact(case, tmp_path, variant, which):
    v = case["variants"][variant]
    names = list(ADAPTERS) if which == "both" else ["qv"]
    out_dir = tmp_path / "inj"
    paths = [v["adapters"][n] for n in names]
    inject_files(v["model"], paths, out_dir, base_weights=case["root"] / "base.safetensors", names=names)
    model = ir.load(out_dir / "model.onnx")
    packed = _packed_nodes(model)
    assert len(packed) == 2  # one per layer
    for node in packed:
        assert _branch_ops(model, node) == (1, 1), node.name
        pads = [n for n in model.graph if n.op_type == "Pad"]
        assert len(pads) == (3 if which == "both" else 2) * 2
    # No adapter: the rank-0 defaults give the base model bit for bit.
    np.testing.assert_array_equal(run_plain(out_dir / "model.onnx", case["feeds"])[0], v["out"])
    for name in names:
        got = run_injected(out_dir / "model.onnx", out_dir / f"{name}.onnx_adapter", case["feeds"])[0]
        assert _rel(got, v["refs"][name]) <= 1e-5, name
        assert _rel(v["out"], v["refs"][name]) > 1e-3  # not vacuous


@pytest.mark.parametrize("variant", ["fp32-vqk", "int4"])
def test_twin_session_strips_the_grouped_branch(case, tmp_path, variant):
    """``base_session=True``: no adapter runs a branch-free twin (the base bit for bit, no slot inputs); an
    adapter (from its file, or a PEFT folder mapped in memory) still runs the grouped branch exactly."""
    v = case["variants"][variant]
    out_dir = tmp_path / "inj"
    paths = [v["adapters"]["ranks"]]
    inject_files(v["model"], paths, out_dir, base_weights=case["root"] / "base.safetensors", names=["ranks"])
    sess = LoraSession(out_dir / "model.onnx", providers=["CPUExecutionProvider"], base_session=True)
    assert sess.base_session is not None
    assert not [i.name for i in sess.base_session.get_inputs() if ".lora_" in i.name]
    np.testing.assert_array_equal(sess.run(None, case["feeds"])[0], v["out"])
    sess.load_adapter("ranks", out_dir / "ranks.onnx_adapter")
    sess.load_adapter("qv", v["adapters"]["qv"])
    for name in ("ranks", "qv"):
        assert _rel(sess.run(None, case["feeds"], adapter=name)[0], v["refs"][name]) <= 1e-5, name
    np.testing.assert_array_equal(sess.run(None, case["feeds"])[0], v["out"])


def test_group_stem_never_clashes_with_a_slot():
    stems = ["m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.v_proj"]
    assert group_stem(stems) == "m.layers.0.self_attn.q_proj+v_proj"
    assert group_stem(["a.q", "b.v"]) == "a.q+b.v"
    assert group_stem(["x.q", "x.q.y"]) == "x.q+q.y"

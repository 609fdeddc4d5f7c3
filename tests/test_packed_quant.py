"""Packed q/k/v quantized to int4 (the onnxruntime-genai builder's ``attn/qkv_proj/MatMul_Q4``), QLoRA-style
adapters (trained on the dequantized base), ``merge --into-float``, and names-based packed resolution.

References: PEFT on a torch model whose Linear weights ARE the ONNX model's dequantized weights."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from conftest import output_of, peft_reference
from foreign_graphs import run_injected, run_plain
from inject_fixtures import REF_SEED, export_base, feeds_of
from models import tiny_llama
from quant_fixtures import BLOCK, dequantized_torch, genai_config, pack, quantize, state_dict_of
from safetensors.numpy import save_file

from lora_export.cli import cli
from lora_export.core.delta import merged_weight
from lora_export.formats.adapter_files import read_adapter_tensors
from lora_export.formats.peft import load_adapter
from lora_export.graph.model.slot_manifest import SLOTS_KEY, SlotManifest
from lora_export.graph.targets.resolve import resolve_targets
from lora_export.graph.verbs.merge import merge_file

QKVO = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
QV = dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"])
GU = dict(r=3, lora_alpha=6, target_modules=["gate_proj", "up_proj", "q_proj"])


@pytest.fixture(scope="module", autouse=True)
def plugin():
    from lora_export_plugins import int4

    int4.register()
    return int4


def _cli(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [*map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """fp32 packed (q/k/v and gate/up) + its int4 quantization; adapters trained on the dequantized base."""
    root = tmp_path_factory.mktemp("qpacked")
    base, make_inputs = tiny_llama()
    export_base(base, make_inputs(0), root / "plain.onnx")
    for name in ("fp32", "int4"):
        (root / name).mkdir()
    pack(root / "plain.onnx", root / "fp32" / "model.onnx", gate_up=True)
    quantize(root / "fp32" / "model.onnx", root / "int4" / "model.onnx")
    deq = dequantized_torch(base, root / "int4" / "model.onnx")
    save_file(state_dict_of(base), str(root / "base.safetensors"))
    save_file(state_dict_of(deq), str(root / "deq.safetensors"))
    fresh = make_inputs(REF_SEED)
    feeds = feeds_of(fresh)
    out = {"root": root, "feeds": feeds, "deq": deq, "base": base, "refs": {}, "float_refs": {}}
    for i, (name, config) in enumerate({"qkvo": QKVO, "qv": QV, "gu": GU}.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft_reference(deq, seed=20 + i, **config)  # QLoRA: trained on Dequant(Wq)
            out["refs"][name] = output_of(peft_model, fresh).numpy()
            peft_model.save_pretrained(str(root / name))
            out["float_refs"][name] = output_of(peft_reference(base, seed=20 + i, **config), fresh).numpy()
    int4_out = run_plain(root / "int4" / "model.onnx", feeds)[0]
    assert _rel(int4_out, output_of(deq, fresh).numpy()) <= 1e-5  # the dequantized torch model is the int4 model
    out["int4_out"] = int4_out
    return out


def _nbits(path) -> dict[str, ir.Node]:
    model = ir.load(str(path))
    return {n.name: n for n in model.graph if n.op_type == "MatMulNBits"}, model


QKV0 = "/model/layers.0/attn/qkv_proj/MatMul_Q4"


@pytest.mark.parametrize("weights", ["base", "deq"])
def test_quantized_slices_resolve_by_value(case, weights):
    """Each of q, k, v lands on its rows of the packed int4 weight, with the original float weights (W within
    the quantization bound) and with the dequantized ones (QLoRA: exact equality with deq)."""
    from safetensors.numpy import load_file

    model = ir.load(str(case["root"] / "int4" / "model.onnx"))
    res = resolve_targets(
        model, load_adapter(case["root"] / "gu"), base_weights=load_file(str(case["root"] / f"{weights}.safetensors"))
    )
    assert not res.unmatched
    got = {r.target.name.split("layers.")[1]: (r.strategy, r.layout.offset, r.layout.width) for r in res.matched}
    assert got["0.self_attn.q_proj"] == ("packed", 0, 32)
    assert got["1.mlp.gate_proj"] == ("packed", 0, 64) and got["1.mlp.up_proj"] == ("packed", 64, 64)
    assert all(r.layout.lossy_write for r in res.matched)
    assert "MatMulNBits int4" in res.matched[0].to_dict()["layout"]


def test_slice_holds_only_its_weight(case, plugin):
    from safetensors.numpy import load_file

    from lora_export.graph.ops.packed_quant import QuantPackedSlice

    nodes, _ = _nbits(case["root"] / "int4" / "model.onnx")
    node = nodes[QKV0]
    w = load_file(str(case["root"] / "base.safetensors"))
    k = QuantPackedSlice(plugin.LAYOUT, 32, 16)
    assert k.holds(node, w["model.layers.0.self_attn.k_proj.weight"])
    assert not k.holds(node, w["model.layers.0.self_attn.v_proj.weight"])
    assert not k.holds(node, w["model.layers.1.self_attn.k_proj.weight"])
    bounds = plugin.LAYOUT.value_bounds(node)
    assert not QuantPackedSlice(plugin.LAYOUT, 48, 16).holds(node, bounds[0][32:48] + 1.01 * bounds[1][32:48])


def test_ambiguous_slices_are_unmatched(plugin, tmp_path):
    """A weight that fits two offsets (k = v) is never guessed."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    from lora_export.graph.ops.packed_quant import find_packed_quantized

    rng = np.random.default_rng(0)
    wq, wk = rng.normal(size=(16, 32)).astype(np.float32), rng.normal(size=(8, 32)).astype(np.float32)
    packed_w = np.concatenate([wq, wk, wk])
    cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True)
    b, scales, _ = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(np.ascontiguousarray(packed_w.T))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 32]))
    ins = [
        x,
        ir.Value(name="B", const_value=ir.tensor(b, name="B")),
        ir.Value(name="s", const_value=ir.tensor(scales, name="s")),
    ]
    node = ir.node(
        "MatMulNBits", ins, attributes={"K": 32, "N": 32, "bits": 4, "block_size": BLOCK}, domain="com.microsoft"
    )

    class T:
        kind, weight_shape = "linear", (8, 32)

    hits, whole = find_packed_quantized([(node, plugin.LAYOUT, ins[1])], T, wk, {})
    assert [h[1].offset for h in hits] == [16, 24] and whole == 0
    T.weight_shape = (16, 32)
    hits, _ = find_packed_quantized([(node, plugin.LAYOUT, ins[1])], T, wq, {})
    assert [h[1].offset for h in hits] == [0]


def test_inject_is_exact_against_the_dequantized_base(case, tmp_path):
    """Branches with zero-padded B′ beside the packed MatMulNBits: exact vs PEFT on Dequant(Wq); no adapter is
    the int4 base bit for bit."""
    root = case["root"]
    code, _, err = _cli(
        "inject",
        root / "int4" / "model.onnx",
        root / "qkvo",
        "-o",
        tmp_path / "inj",
        "--base-weights",
        root / "base.safetensors",
    )
    assert code == 0, err
    model = tmp_path / "inj" / "model.onnx"
    np.testing.assert_array_equal(run_plain(model, case["feeds"])[0], case["int4_out"])
    got = run_injected(model, tmp_path / "inj" / "qkvo.onnx_adapter", case["feeds"])[0]
    assert _rel(got, case["refs"]["qkvo"]) <= 1e-5
    assert _rel(case["int4_out"], case["refs"]["qkvo"]) > 1e-3  # not vacuous


@pytest.mark.parametrize("name", ["qv", "qkvo"])
def test_merge_requantizes_only_the_slices(case, tmp_path, plugin, name):
    """--requantize: the targets' output columns are ORT's quantization of deq(W₀) + ΔW (within half a step
    of the new scale per entry, a whole step where the code clamps); other columns are bit-identical."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    from lora_export.graph.ops.packed_quant import QuantPackedSlice

    root = case["root"]
    src = root / "int4" / "model.onnx"
    report = merge_file(src, root / name, tmp_path / "m.onnx", base_weights=root / "base.safetensors", requantize=True)
    before, _ = _nbits(src)
    after, _ = _nbits(tmp_path / "m.onnx")
    b0, b1 = before[QKV0].inputs[1].const_value.numpy(), after[QKV0].inputs[1].const_value.numpy()
    s0, s1 = before[QKV0].inputs[2].const_value.numpy(), after[QKV0].inputs[2].const_value.numpy()
    k = slice(32, 48)
    if name == "qv":
        np.testing.assert_array_equal(b1[k], b0[k])  # k's columns: untouched
        np.testing.assert_array_equal(s1[k], s0[k])
    assert not np.array_equal(b1[:32], b0[:32]) and not np.array_equal(b1[48:], b0[48:])
    # Untargeted ops are untouched.
    np.testing.assert_array_equal(
        after["/model/layers.0/mlp/gate_up_proj/MatMul_Q4"].inputs[1].const_value.numpy(),
        before["/model/layers.0/mlp/gate_up_proj/MatMul_Q4"].inputs[1].const_value.numpy(),
    )
    peft = load_adapter(root / name)
    q0 = next(t for t in peft if t.name.endswith("layers.0.self_attn.q_proj"))
    deq0 = plugin.LAYOUT.read(before[QKV0])[:32]
    target = merged_weight(deq0, q0, np.float32)  # deq(W₀) + ΔW as merge computes it (fp32)
    np.testing.assert_allclose(target - deq0, q0.B @ q0.A * q0.scale, atol=1e-6)
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True))
    packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(target.T))
    np.testing.assert_array_equal(b1[:32], packed)  # bit for bit ORT's quantizer on the slice
    np.testing.assert_array_equal(s1[:32].reshape(scales.shape), scales)
    assert QuantPackedSlice(plugin.LAYOUT, 0, 32).holds(after[QKV0], target)  # the bound stated in the README
    entries = {m["target"].split("layers.")[1]: m for m in report.merged}
    write = entries["0.self_attn.q_proj"]["write"]
    new = plugin.LAYOUT.read(after[QKV0])[:32]
    assert write["max_abs_error"] == pytest.approx(np.abs(new.astype(np.float64) - target).max(), rel=1e-6)
    assert 0 < write["rel_frobenius_error"] < 0.1 and write["delta_kept"] > 0.5
    got = run_plain(tmp_path / "m.onnx", case["feeds"])[0]
    assert _rel(got, case["refs"][name]) < _rel(case["int4_out"], case["refs"][name])


@pytest.mark.parametrize("name", ["qv", "qkvo", "gu"])
def test_merge_into_float_is_exact(case, tmp_path, name):
    """--into-float: each quantized op holding a target becomes a float MatMul on deq(Wq) + ΔW: exact vs PEFT on
    the dequantized base; the report lists the converted nodes; other ops stay MatMulNBits."""
    root = case["root"]
    out = tmp_path / "m.onnx"
    code, stdout, err = _cli(
        "merge",
        root / "int4" / "model.onnx",
        root / name,
        "-o",
        out,
        "--base-weights",
        root / "base.safetensors",
        "--into-float",
        "--json",
    )
    assert code == 0, err
    report = json.loads(stdout)
    converted = {c["node"]: c for c in report["converted"]}
    expected = {QKV0, "/model/layers.1/attn/qkv_proj/MatMul_Q4"}
    if name == "qkvo":
        expected |= {f"/model/model/layers.{i}/self_attn/o_proj/MatMul_Q4" for i in (0, 1)}
    if name == "gu":
        expected |= {f"/model/layers.{i}/mlp/gate_up_proj/MatMul_Q4" for i in (0, 1)}
    assert set(converted) == expected, converted
    assert converted[QKV0]["into"] == "/model/layers.0/attn/qkv_proj/MatMul" and converted[QKV0]["dtype"] == "FLOAT"
    remaining, _ = _nbits(out)
    assert not set(remaining) & expected and len(remaining) == 2 * 4 + 1 - len(expected)
    got = run_plain(out, case["feeds"])[0]
    assert _rel(got, case["refs"][name]) <= 1e-5
    assert _rel(case["int4_out"], case["refs"][name]) > 1e-3


def test_into_float_without_adapter_effect_is_the_base(case, tmp_path):
    """A zero-scale merge into float: the converted model computes the int4 base (the float MatMul is exact)."""
    root = case["root"]
    merge_file(
        root / "int4" / "model.onnx",
        root / "qkvo",
        tmp_path / "m.onnx",
        base_weights=root / "base.safetensors",
        into_float=True,
        scale=0.0,
    )
    assert _rel(run_plain(tmp_path / "m.onnx", case["feeds"])[0], case["int4_out"]) <= 1e-5


def test_requantize_and_into_float_exclude_each_other(case, tmp_path):
    root = case["root"]
    out = tmp_path / "m.onnx"
    code, _, err = _cli("merge", root / "int4" / "model.onnx", root / "qv", "-o", out, "--requantize", "--into-float")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--into-float" in err, err
    assert not out.exists()


# -- names-based: the genai builder's names, widths from genai_config.json -----------------------------


@pytest.fixture()
def named(case, tmp_path):
    """Copies of the fp32 and int4 models in their own folders, marked as the builder marks its models
    (genai_config.json is added per test)."""
    out = {}
    for name in ("fp32", "int4"):
        (tmp_path / name).mkdir()
        model = ir.load(str(case["root"] / name / "model.onnx"))
        model.producer_name = "onnxruntime-genai"
        for node in model.graph:  # the builder's name for o_proj: attn/o_proj, not self_attn/o_proj
            node.name = (
                (node.name or "").replace("/model/model/", "/model/").replace("/self_attn/o_proj/", "/attn/o_proj/")
            )
        out[name] = tmp_path / name / "model.onnx"
        ir.save(model, str(out[name]))
    return out


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_names_with_genai_config(case, named, tmp_path, kind):
    root = case["root"]
    genai_config(named[kind].parent)
    code, stdout, err = _cli("inject", named[kind], root / "gu", "-o", tmp_path / "inj", "--json")
    assert code == 0, err
    report = json.loads(stdout)["adapters"]["gu"]["resolution"]
    assert {r["strategy"] for r in report} == {"genai-name"}
    refs = case["refs"] if kind == "int4" else case["float_refs"]
    got = run_injected(tmp_path / "inj" / "model.onnx", tmp_path / "inj" / "gu.onnx_adapter", case["feeds"])[0]
    assert _rel(got, refs["gu"]) <= 1e-5
    flag = "--into-float" if kind == "int4" else "--force"
    code, stdout, err = _cli("merge", named[kind], root / "qkvo", "-o", tmp_path / "m.onnx", flag, "--json")
    assert code == 0, err
    o_proj = [t for t in json.loads(stdout)["targets"] if t["target"].endswith("o_proj")]
    assert len(o_proj) == 2 and all(t["strategy"] == "genai-name" and "/attn/o_proj/" in t["node"] for t in o_proj)
    assert _rel(run_plain(tmp_path / "m.onnx", case["feeds"])[0], refs["qkvo"]) <= 1e-5


def test_names_without_config_need_the_adapters_own_widths(case, named, tmp_path):
    """No genai_config.json: q/k/v slices only when the adapter's q, k and v of the layer sum to the packed width."""
    root = case["root"]
    code, _, err = _cli("merge", named["fp32"], root / "qv", "-o", tmp_path / "m.onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--base-weights" in err and "genai_config.json" in err
    assert not (tmp_path / "m.onnx").exists()
    # q, k and v all targeted: their widths 32 + 16 + 16 are the packed 64 rows.
    code, _, err = _cli("merge", named["fp32"], root / "qkvo", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    assert _rel(run_plain(tmp_path / "m.onnx", case["feeds"])[0], case["float_refs"]["qkvo"]) <= 1e-5


@pytest.mark.parametrize(
    "heads, why",
    [((2, 4, 8), "genai_config.json gives q/k/v widths [16, 32, 32]"), ((2, 3, 8), "the model's is (24, 32)")],
    ids=["swapped-heads", "wrong-split"],
)
@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_wrong_genai_config_is_refused(case, named, tmp_path, heads, why, kind):
    """A config whose widths do not add up (heads and kv heads swapped), or add up but disagree with the
    adapter's shapes, is refused in one line, never sliced."""
    h, kv, hd = heads
    genai_config(named[kind].parent, heads=h, kv_heads=kv, head_size=hd)
    flag = "--into-float" if kind == "int4" else "--force"
    code, _, err = _cli("merge", named[kind], case["root"] / "qkvo", "-o", tmp_path / "m.onnx", flag)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert why in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_names_are_checked_by_value(case, tmp_path):
    """Parts packed in another order (k, v, q): with --base-weights the names' slice is rejected by value and
    each part is found where it is; merge is exact."""
    base = case["base"]
    root = tmp_path
    export_base(base, {k: __import__("torch").from_numpy(v) for k, v in case["feeds"].items()}, root / "plain.onnx")
    (root / "m").mkdir()
    pack(root / "plain.onnx", root / "m" / "model.onnx", order=("k_proj", "v_proj", "q_proj"))
    genai_config(root / "m")
    weights = case["root"] / "base.safetensors"
    report = merge_file(root / "m" / "model.onnx", case["root"] / "qkvo", root / "out.onnx", base_weights=weights)
    offsets = {
        r.target.name.split("layers.")[1]: (r.strategy, r.layout.offset)
        for r in report.resolution.matched
        if "o_proj" not in r.target.name
    }
    assert offsets["0.self_attn.q_proj"] == ("packed", 32) and offsets["0.self_attn.k_proj"] == ("packed", 0)
    assert _rel(run_plain(root / "out.onnx", case["feeds"])[0], case["float_refs"]["qkvo"]) <= 1e-5


def test_read_tensors_match_the_slots(case, tmp_path):
    """The adapter file written for a packed int4 slot holds the module's own shapes."""
    root = case["root"]
    code, _, err = _cli(
        "inject",
        root / "int4" / "model.onnx",
        root / "qv",
        "-o",
        tmp_path / "inj",
        "--base-weights",
        root / "deq.safetensors",
    )
    assert code == 0, err
    tensors = read_adapter_tensors(tmp_path / "inj" / "qv.safetensors")
    # One packed op's q and v read one pair: A_cat = [A′_q | A′_v] (in, 2+2), B_cat (2+2, total) block-diagonal,
    # each B′ in its slot's columns, zeros elsewhere (k's columns included).
    a = next(v for k, v in tensors.items() if k.endswith("layers.0.self_attn.q_proj+v_proj.lora_A"))
    b = next(v for k, v in tensors.items() if k.endswith("layers.0.self_attn.q_proj+v_proj.lora_B"))
    manifest = SlotManifest.from_json(ir.load(tmp_path / "inj" / "model.onnx").metadata_props[SLOTS_KEY])
    q, v = (
        next(s for m, s in manifest.slots.items() if m.endswith(f"layers.0.self_attn.{p}"))
        for p in ("q_proj", "v_proj")
    )
    assert a.shape == (32, 4) and b.shape == (4, q.packed[1]) and q.a == v.a
    (qo, _), (vo, _), width = q.packed, v.packed, q.weight_shape[0]
    assert np.abs(b[:2, qo : qo + width]).min() > 0 and np.abs(b[2:, vo : vo + v.weight_shape[0]]).min() > 0
    b[:2, qo : qo + width] = 0
    b[2:, vo : vo + v.weight_shape[0]] = 0
    assert not b.any()


def test_other_slices_stay_bit_identical_whatever_quantized_them(case, tmp_path, plugin):
    """k's codes as another quantizer might leave them (no code at the range's end, so requantizing deq(k)
    would pick another scale): a q/v merge must not touch them."""
    model = ir.load(str(case["root"] / "int4" / "model.onnx"))
    node = next(n for n in model.graph if n.name == QKV0)
    b = node.inputs[1].const_value.numpy().copy()
    codes = plugin._unpack(b.reshape(64, -1), 4, 32)
    codes[32:48][codes[32:48] == 0] = 1
    b = plugin._pack(codes, 4, b.shape[1] * b.shape[2], 0).reshape(b.shape)
    node.inputs[1].const_value = ir.tensor(b, name=node.inputs[1].name)
    ir.save(model, str(tmp_path / "k.onnx"))
    w0 = plugin.LAYOUT.read(node)
    weights = case["root"] / "base.safetensors"
    merge_file(tmp_path / "k.onnx", case["root"] / "qv", tmp_path / "m.onnx", base_weights=weights, requantize=True)
    after = next(n for n in ir.load(str(tmp_path / "m.onnx")).graph if n.name == QKV0)
    np.testing.assert_array_equal(after.inputs[1].const_value.numpy()[32:48], b[32:48])
    np.testing.assert_array_equal(plugin.LAYOUT.read(after)[32:48], w0[32:48])


def test_into_float_keeps_fp16_and_the_bias(plugin, tmp_path):
    """fp16 scales: the float MatMul's weight is fp16, deq(Wq) + ΔW rounded once; the bias input follows as an
    Add; the output keeps its name."""
    import onnx
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24)
    cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=False)
    w0 = np.ascontiguousarray(lin.weight.detach().numpy().T)
    b, scales, zp = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(w0)
    bias = lin.bias.detach().numpy().astype(np.float16)
    arrays = {"B": b, "scales": scales.astype(np.float16), "zp": zp, "bias": bias}
    mm = onnx.helper.make_node(
        "MatMulNBits", ["x", "B", "scales", "zp", "", "bias"], ["y"], domain="com.microsoft", name="/lin/MatMul_Q4",
        K=32, N=24, bits=4, block_size=BLOCK,
    )  # fmt: skip
    f16 = onnx.TensorProto.FLOAT16
    graph = onnx.helper.make_graph(
        [mm], "g", [onnx.helper.make_tensor_value_info("x", f16, [3, 32])],
        [onnx.helper.make_tensor_value_info("y", f16, [3, 24])],
        [onnx.numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )  # fmt: skip
    opsets = [onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)]
    onnx.save(onnx.helper.make_model(graph, ir_version=10, opset_imports=opsets), str(tmp_path / "lin.onnx"))
    node = next(iter(ir.load(str(tmp_path / "lin.onnx")).graph))
    deq = plugin.LAYOUT.read(node)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(deq))
    from peft import LoraConfig, get_peft_model

    wrapped = torch.nn.Sequential()
    wrapped.add_module("lin", lin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(wrapped, LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))
    torch.nn.init.normal_(pm.base_model.model.lin.lora_B["default"].weight, std=0.1)
    pm.save_pretrained(str(tmp_path / "ad"))
    report = merge_file(tmp_path / "lin.onnx", tmp_path / "ad", tmp_path / "m.onnx", into_float=True)
    converted = [(c["node"], c["into"], c["dtype"]) for c in report.converted]
    assert converted == [("/lin/MatMul_Q4", "/lin/MatMul", "FLOAT16")]
    merged = ir.load(str(tmp_path / "m.onnx"))
    assert [n.op_type for n in merged.graph] == ["MatMul", "Add"] and merged.graph.outputs[0].name == "y"
    (t,) = list(load_adapter(tmp_path / "ad"))
    expected = merged_weight(deq, t, np.float32).astype(np.float16)
    w = next(iter(merged.graph)).inputs[1].const_value.numpy()
    np.testing.assert_array_equal(w, expected.T)
    x = np.random.default_rng(1).normal(size=(3, 32)).astype(np.float16)
    y = run_plain(tmp_path / "m.onnx", {"x": x})[0]
    ref = x.astype(np.float32) @ expected.astype(np.float32).T + arrays["bias"].astype(np.float32)
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=1e-2, atol=1e-2)

"""The int4 MatMulNBits plugin: a tiny LLaMA quantized by ONNX Runtime's own quantizer (block size 16,
symmetric and asymmetric). inject is exact against PEFT on the dequantized base; merge requantizes exactly
as ORT's quantizer would quantize deq(W₀) + ΔW, and reports what rounding cost."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, saved_peft_reference
from models import tiny_llama
from onnx_fixtures import export_onnx, run_onnx

from lora_export import load_adapter, merge_file
from lora_export.cli import cli
from lora_export.formats.adapter_files import read_adapter_tensors
from lora_export.graph.ops.layouts import get_layout
from lora_export.graph.verbs.inject import inject_files

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module", autouse=True)
def plugin():
    """Register the plugin (its entry point is visible only once the package is reinstalled)."""
    from lora_export_plugins import int4

    int4.register()
    return int4


def _quantize(src: Path, out: Path, symmetric: bool) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=BLOCK, is_symmetric=symmetric)
    q.process()
    q.model.save_model_to_file(str(out))
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """TorchScript export of tiny_llama, and its int4 versions: symmetric (no zero points) and asymmetric."""
    root = tmp_path_factory.mktemp("int4")
    base, make_inputs = tiny_llama()
    fp32 = export_onnx(base, make_inputs(0), root / "fp32.onnx", dynamo=False)
    quantized = {sym: _quantize(fp32, root / f"int4-{'sym' if sym else 'asym'}.onnx", sym) for sym in (True, False)}
    return base, make_inputs, fp32, quantized


def _nbits_nodes(path: Path) -> tuple[ir.Model, dict[str, ir.Node]]:
    """The MatMulNBits nodes by the torch module path their name carries."""
    model = ir.load(str(path))
    nodes = {}
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            assert node.name.startswith("/model/") and node.name.endswith("/MatMul_Q4"), node.name
            nodes[node.name[len("/model/") : -len("/MatMul_Q4")].replace("/", ".")] = node
    return model, nodes


def _dequantized_torch(base: torch.nn.Module, path: Path) -> torch.nn.Module:
    """``base`` with every quantized Linear's weight replaced by its dequantized int4 weight."""
    model = copy.deepcopy(base)
    _, nodes = _nbits_nodes(path)
    assert len(nodes) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    with torch.no_grad():
        for module, node in nodes.items():
            layer = model.get_submodule(module)
            layer.weight.copy_(torch.from_numpy(get_layout(node).read(node)))
    return model


def _rel(actual: np.ndarray, expected) -> float:
    exp = expected.detach().float().numpy() if isinstance(expected, torch.Tensor) else expected
    return float(np.abs(actual - exp).max() / np.abs(exp).max())


def test_entry_point_declared():
    # (tomllib is 3.11+; the table's lines are read as text)
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split('[project.entry-points."lora_export.op_layouts"]\n', 1)[1].split("\n[", 1)[0]
    assert 'int4 = "lora_export_plugins.int4:register"' in table.splitlines()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_read_is_ort_dequantization(bases, symmetric):
    """read() equals what ONNX Runtime computes: a MatMulNBits graph applied to the identity gives deq(B)ᵀ."""
    _, _, _, quantized = bases
    _, nodes = _nbits_nodes(quantized[symmetric])
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "lm_head"):
        node = nodes[module]
        layout = get_layout(node)
        w = layout.read(node)
        n, k = layout.weight_shape(node)
        assert w.shape == (n, k) and w.dtype == np.float32
        inputs = [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [k, k]),
        ]
        inits = [ir.serde.serialize_tensor(v.const_value) for v in node.inputs[1:]]
        attrs = {a.name: a.value for a in node.attributes.values()}
        mm = onnx.helper.make_node(
            "MatMulNBits", ["x", *[v.name for v in node.inputs[1:]]], ["y"], domain="com.microsoft", **attrs
        )
        graph = onnx.helper.make_graph(
            [mm], "g", inputs, [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits
        )
        proto = onnx.helper.make_model(
            graph,
            ir_version=10,
            opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)],
        )
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": np.eye(k, dtype=np.float32)})[0]
        np.testing.assert_array_equal(y, w.T)
        assert layout.describe(node).startswith(f"MatMulNBits int4 W(N,K) block {BLOCK}")


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", [(32, 32), (24, 48), (8, 80)])
def test_requantize_is_ort_quantizer(plugin, symmetric, shape):
    """quantize() is ORT's quantizer bit for bit (B, scales, zero points), odd block counts included."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    n, k = shape
    rng = np.random.default_rng(n + k)
    w = rng.normal(size=(n, k)).astype(np.float32)
    w[0, :BLOCK] = np.abs(w[0, :BLOCK])  # one-signed blocks exercise both range rules
    w[1, :BLOCK] = -np.abs(w[1, :BLOCK])
    cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=symmetric)
    packed, scales, zp = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(np.ascontiguousarray(w.T))
    node = _node_for(packed, scales, None if symmetric else zp, n, k)
    codes, our_scales, our_zp = plugin.LAYOUT.quantize(node, w)
    n_blocks = -(-k // BLOCK)
    np.testing.assert_array_equal(plugin._pack(codes, 4, n_blocks * BLOCK // 2, 0).reshape(packed.shape), packed)
    np.testing.assert_array_equal(our_scales, scales)
    if not symmetric:
        np.testing.assert_array_equal(plugin._pack(our_zp, 4, (n_blocks + 1) // 2, 8), zp)
    # and the node holds w: within the quantization bound of its own quantization, but not another weight
    assert plugin.LAYOUT.holds(node, w) and plugin.LAYOUT.holds(node, w.T.copy())
    assert not plugin.LAYOUT.holds(node, w + 0.5 * np.abs(scales).max())


def _node_for(packed, scales, zp, n, k) -> ir.Node:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, k]))
    ins = [x]
    for name, arr in (("B", packed), ("scales", scales), ("zp", zp)):
        if arr is not None:
            ins.append(ir.Value(name=name, const_value=ir.tensor(arr, name=name)))
    attrs = {"K": k, "N": n, "bits": 4, "block_size": BLOCK}
    return ir.node("MatMulNBits", ins, attributes=attrs, domain="com.microsoft", name="lin/MatMul_Q4")


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_inject_exact_against_dequantized_peft(bases, tmp_path, symmetric):
    """Inject: the adapter is exact against PEFT on the dequantized base; no adapter is the int4 base exactly."""
    base, make_inputs, _, quantized = bases
    deq = _dequantized_torch(base, quantized[symmetric])
    peft_model = saved_peft_reference(deq, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    inputs = make_inputs(3)
    ref = output_of(peft_model, inputs)
    int4_out = run_onnx(quantized[symmetric], inputs)
    assert _rel(int4_out, output_of(deq, inputs)) <= 1e-5  # the dequantized torch model is the int4 model
    assert _rel(int4_out, ref) > 1e-3, "vacuous: the adapter changes nothing"

    result = inject_files(quantized[symmetric], [tmp_path / "adapter"], tmp_path / "out")
    slots = result.manifest.slots
    assert {s.op for s in slots.values()} == {"MatMulNBits"} and len(slots) == 4
    assert {s.dtype for s in slots.values()} == {"float32"}
    model = tmp_path / "out" / "model.onnx"
    feeds = {k: v.numpy() for k, v in inputs.items()}
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, feeds)[0], int4_out)  # rank-0 defaults: the base, exactly
    tensors = read_adapter_tensors(tmp_path / "out" / "adapter.safetensors")
    assert _rel(sess.run(None, {**feeds, **tensors})[0], ref) <= 1e-5


def test_inject_dora(bases, tmp_path):
    base, make_inputs, _, quantized = bases
    deq = _dequantized_torch(base, quantized[False])
    peft_model = saved_peft_reference(deq, tmp_path / "dora", r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True)
    inputs = make_inputs(4)
    inject_files(quantized[False], [tmp_path / "dora"], tmp_path / "out")
    feeds = {k: v.numpy() for k, v in inputs.items()}
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    tensors = read_adapter_tensors(tmp_path / "out" / "dora.safetensors")
    assert _rel(sess.run(None, {**feeds, **tensors})[0], output_of(peft_model, inputs)) <= 1e-5


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_merge_requantizes_like_ort_and_reports(bases, tmp_path, plugin, symmetric):
    """Merge: each target's new B/scales/zero points are ORT's quantization of deq(W₀) + ΔW; the merged
    model computes the dequantized merged weights; the report's error numbers are right."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    base, make_inputs, _, quantized = bases
    src = quantized[symmetric]
    deq = _dequantized_torch(base, src)
    peft_model = saved_peft_reference(deq, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    report = merge_file(src, tmp_path / "adapter", tmp_path / "merged.onnx", requantize=True)
    assert len(report.merged) == 4
    _, old_nodes = _nbits_nodes(src)
    _, new_nodes = _nbits_nodes(tmp_path / "merged.onnx")
    inner = peft_model.base_model.model
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=symmetric))
    for entry in report.merged:
        module = entry["target"]
        old, new = old_nodes[module], new_nodes[module]
        lora = inner.get_submodule(module)
        delta = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight).detach().numpy() * lora.scaling[
            "default"
        ]
        w0 = plugin.LAYOUT.read(old)
        target = (w0 + delta).astype(np.float32)
        packed, scales, zp = quantizer.qbits_block_quant(np.ascontiguousarray(target.T))
        np.testing.assert_array_equal(new.inputs[1].const_value.numpy(), packed)
        np.testing.assert_array_equal(new.inputs[2].const_value.numpy().reshape(scales.shape), scales)
        if not symmetric:
            np.testing.assert_array_equal(new.inputs[3].const_value.numpy().reshape(zp.shape), zp)
        else:
            assert len(new.inputs) == 3
        w1 = plugin.LAYOUT.read(new)
        err = w1.astype(np.float64) - target
        d = np.asarray(delta, np.float64)
        rep = entry["write"]
        assert rep["scheme"] == f"int4 block {BLOCK} {'symmetric' if symmetric else 'asymmetric'}"
        assert rep["max_abs_error"] == pytest.approx(np.abs(err).max(), rel=1e-6)
        assert rep["rel_frobenius_error"] == pytest.approx(np.linalg.norm(err) / np.linalg.norm(target), rel=1e-5)
        assert rep["delta_kept"] == pytest.approx(np.linalg.norm(w1 - w0) / np.linalg.norm(d), rel=1e-5)
        assert rep["delta_error"] == pytest.approx(np.linalg.norm(w1 - w0 - d) / np.linalg.norm(d), rel=1e-5)
        # within what requantization allows: half a step per entry (a whole one where the code clamps)
        assert plugin.LAYOUT.holds(new, target)
        assert 0 < rep["rel_frobenius_error"] < 0.1
    # The merged model computes the dequantized merged weights (the rest of the graph is untouched) ...
    merged_torch = _dequantized_torch(base, tmp_path / "merged.onnx")
    inputs = make_inputs(5)
    merged_out = run_onnx(tmp_path / "merged.onnx", inputs)
    assert _rel(merged_out, output_of(merged_torch, inputs)) <= 1e-5
    # ... and lands nearer PEFT on the dequantized base than the unmerged int4 model does.
    ref = output_of(peft_model, inputs)
    assert _rel(merged_out, ref) < _rel(run_onnx(src, inputs), ref)


def test_base_weights_resolve_by_value(bases, tmp_path, plugin):
    """--base-weights with the original fp32 weights: name matches are confirmed by value (holds), and with
    the names gone, the weights are found by value alone."""
    base, make_inputs, _, quantized = bases
    src = quantized[False]
    weights = {k: v.detach().numpy() for k, v in base.state_dict().items()}
    saved_peft_reference(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    report = merge_file(src, tmp_path / "adapter", tmp_path / "named.onnx", base_weights=weights, requantize=True)
    assert {r.strategy for r in report.resolution.targets} == {"node-name"}
    _, nodes = _nbits_nodes(src)
    q0 = nodes["model.layers.0.self_attn.q_proj"]
    assert plugin.LAYOUT.holds(q0, weights["model.layers.0.self_attn.q_proj.weight"])
    assert not plugin.LAYOUT.holds(q0, weights["model.layers.1.self_attn.q_proj.weight"])
    # Names stripped: only values can tell the nodes apart.
    model = ir.load(str(src))
    for i, node in enumerate(model.graph):
        node.name = f"n{i}"
    anonymous = tmp_path / "anonymous.onnx"
    ir.save(model, str(anonymous))
    report = merge_file(
        anonymous, tmp_path / "adapter", tmp_path / "anon-merged.onnx", base_weights=weights, requantize=True
    )
    assert {r.strategy for r in report.resolution.targets} == {"fingerprint"}
    named = merge_file(src, tmp_path / "adapter", tmp_path / "x.onnx", requantize=True)
    by_name = {m["target"]: m["initializer"] for m in named.merged}
    assert {m["target"]: m["initializer"] for m in report.merged} == by_name


def test_cli_merge_and_inject(bases, tmp_path):
    base, make_inputs, _, quantized = bases
    saved_peft_reference(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            "--requantize",
            str(quantized[True]),
            str(tmp_path / "adapter"),
            "-o",
            str(tmp_path / "m.onnx"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"]["merged_weights"] == 4
    assert report["targets"][0]["layout"].startswith("MatMulNBits int4")
    assert all(0 < m["write"]["delta_kept"] for m in report["merged"])
    result = CliRunner().invoke(
        cli, ["merge", "--requantize", str(quantized[True]), str(tmp_path / "adapter"), "-o", str(tmp_path / "h.onnx")]
    )
    assert result.exit_code == 0, result.output
    assert "requantized" in result.stdout
    result = CliRunner().invoke(
        cli, ["inject", str(quantized[True]), str(tmp_path / "adapter"), "-o", str(tmp_path / "inj")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "inj" / "model.onnx").is_file()


def test_shared_quantized_weight_refused(bases, tmp_path):
    """A quantized weight another module's node also reads is refused in one line (exit 2), nothing written."""
    base, _, _, quantized = bases
    model = ir.load(str(quantized[True]))
    nodes = {n.name: n for n in model.graph}
    q0 = nodes["/model/model/layers.0/self_attn/q_proj/MatMul_Q4"]
    q1 = nodes["/model/model/layers.1/self_attn/q_proj/MatMul_Q4"]
    for i in (1, 2):
        q1.replace_input_with(i, q0.inputs[i])
    shared = tmp_path / "shared.onnx"
    ir.save(model, str(shared))
    saved_peft_reference(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["merge", "--requantize", str(shared), str(tmp_path / "adapter"), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "shared" in lines[0] and "quantized" in lines[0], result.stderr
    assert not out.exists()


class _Lin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32, 24)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_inject_with_bias_input(plugin, tmp_path, dora):
    """MatMulNBits with its own bias input (as ORT's fusions make it): LoRA adds after it; DoRA scales the
    op's output without the bias, which moves after g's Mul."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    torch.manual_seed(0)
    module = _Lin().eval()
    w = module.lin.weight.detach().numpy()
    cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=False)
    packed, scales, zp = DefaultWeightOnlyQuantizer(cfg).qbits_block_quant(np.ascontiguousarray(w.T))
    node = _node_for(packed, scales, zp, 24, 32)
    with torch.no_grad():
        module.lin.weight.copy_(torch.from_numpy(plugin.LAYOUT.read(node)))
    bias = module.lin.bias.detach().numpy()
    mm = onnx.helper.make_node(
        "MatMulNBits",
        ["x", "B", "scales", "zp", "", "bias"],
        ["y"],
        domain="com.microsoft",
        name="/lin/MatMul_Q4",
        K=32,
        N=24,
        bits=4,
        block_size=BLOCK,
    )
    inits = [
        onnx.numpy_helper.from_array(a, n) for n, a in (("B", packed), ("scales", scales), ("zp", zp), ("bias", bias))
    ]
    graph = onnx.helper.make_graph(
        [mm],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 24])],
        inits,
    )
    proto = onnx.helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.save(proto, str(tmp_path / "lin.onnx"))
    x = torch.randn(3, 32)
    base_out = ort.InferenceSession(str(tmp_path / "lin.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )[0]
    assert _rel(base_out, module(x)) <= 1e-5
    peft_model = saved_peft_reference(module, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["lin"], use_dora=dora)
    inject_files(tmp_path / "lin.onnx", [tmp_path / "ad"], tmp_path / "out")
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x.numpy()})[0], base_out)
    tensors = read_adapter_tensors(tmp_path / "out" / "ad.safetensors")
    assert _rel(sess.run(None, {"x": x.numpy(), **tensors})[0], output_of(peft_model, {"x": x})) <= 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("zero_points", ["none", "uint8", "float"])
def test_read_is_ort_dequantization_all_forms(plugin, dtype, zero_points):
    """read() on synthetic codes: no / packed uint8 / float zero points, fp32 and fp16 scales, three blocks
    (an odd count: the zero points' last byte is half padding), against ORT applied to the identity."""
    rng = np.random.default_rng(7)
    n, k = 24, 48
    n_blocks = k // BLOCK
    codes = rng.integers(0, 16, size=(n, k)).astype(np.uint8)
    arrays = {
        "B": plugin._pack(codes, 4, n_blocks * BLOCK // 2, 0).reshape(n, n_blocks, -1),
        "scales": (rng.random(n * n_blocks) * 0.1 - 0.05).astype(dtype),  # the flat (N·n_blocks) form
    }
    if zero_points == "uint8":
        arrays["zp"] = plugin._pack(rng.integers(0, 16, size=(n, n_blocks)).astype(np.uint8), 4, 2, 8).reshape(-1)
    elif zero_points == "float":
        arrays["zp"] = (rng.random((n, n_blocks)) * 15).astype(dtype)
    tt = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    mm = onnx.helper.make_node(
        "MatMulNBits", ["x", *arrays], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK
    )
    graph = onnx.helper.make_graph(
        [mm],
        "g",
        [onnx.helper.make_tensor_value_info("x", tt, [k, k])],
        [onnx.helper.make_tensor_value_info("y", tt, None)],
        [onnx.numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    proto = onnx.helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.microsoft", 1)],
    )
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.eye(k, dtype=dtype)})[0].astype(np.float32).T
    node = next(iter(ir.from_proto(proto).graph))
    w = plugin.LAYOUT.read(node)
    if zero_points == "float" and dtype == np.float32:
        # q·s − zp·s: a fused multiply-add on some CPUs may differ in the last bit
        np.testing.assert_allclose(w, y, rtol=2.0**-22, atol=0)
    else:
        np.testing.assert_array_equal(w, y)
    assert plugin.LAYOUT.activation_dtype(node).numpy() == np.dtype(dtype)


def test_merge_refuses_float_zero_points_and_reordering_g_idx(plugin):
    """No requantizer for float zero points (HQQ), no layout for a reordering g_idx: one-line refusals."""
    from lora_export.errors import ModelError

    rng = np.random.default_rng(3)
    packed = rng.integers(0, 256, size=(8, 2, 8)).astype(np.uint8)
    scales = np.full((8, 2), 0.01, np.float32)
    node = _node_for(packed, scales, np.full((8, 2), 7.5, np.float32), 8, 32)
    w = plugin.LAYOUT.read(node)
    with pytest.raises(ModelError, match="float zero points"):
        plugin.LAYOUT.write(node, w)
    g_idx = ir.Value(name="g_idx", const_value=ir.tensor(np.arange(32, dtype=np.int32)[::-1].copy(), name="g_idx"))
    node = _node_for(packed, scales, None, 8, 32)
    reordered = ir.node(
        "MatMulNBits",
        [*node.inputs[:3], None, g_idx],
        attributes={"K": 32, "N": 8, "bits": 4, "block_size": BLOCK},
        domain="com.microsoft",
        name="g",
    )
    with pytest.raises(ModelError, match="g_idx"):
        plugin.LAYOUT.read(reordered)


def test_merge_into_quantized_weights_needs_requantize(bases, tmp_path):
    """Exit 0 means exact: a merge that requantizes (lossy) happens only when asked; inject is the exact path."""
    base, _, _, quantized = bases
    saved_peft_reference(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(cli, ["merge", str(quantized[True]), str(tmp_path / "adapter"), "-o", str(out)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--requantize" in result.stderr and "inject" in result.stderr
    assert not out.exists()


def test_stored_base_of_a_quantized_head_is_recognized(bases, tmp_path):
    """PEFT stores lm_head's float base weight; the int4 lm_head holds it up to quantization: not "another base"."""
    base, _, _, quantized = bases
    saved_peft_reference(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    assert load_adapter(tmp_path / "adapter").stored_base, "PEFT no longer stores lm_head's base layer"
    args = [str(quantized[True]), str(tmp_path / "adapter")]
    result = CliRunner().invoke(cli, ["inject", *args, "-o", str(tmp_path / "inj")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["merge", "--requantize", *args, "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output

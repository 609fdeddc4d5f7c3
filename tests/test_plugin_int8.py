"""The int8 plugin: models quantized by onnxruntime's own quantizer (dynamic MatMulInteger and QDQ).

References: PEFT on a torch model whose base weights are the *dequantized* ones (what the quantized graph
computes); for dynamic quantization (activations quantized at run time) the LoRA branch's contribution,
injected(adapter) − injected(no adapter), against x·ΔWᵀ.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, peft_reference
from inject_fixtures import export_base, feeds_of, rel_err
from models import tiny_llama
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from lora_export.cli import cli
from lora_export.formats.adapter_files import read_adapter_tensors
from lora_export.graph.verbs.inject import inject_files

TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _registered():
    from lora_export_plugins import int8

    int8.register()
    int8.register()  # idempotent
    yield


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    # ORT's extended optimizations fuse DequantizeLinear(int8) → MatMul into MatMulNBits, which quantizes the
    # activations too (0.75% off on tiny_llama): the graph as written is what the reference is exact against.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, feeds) -> np.ndarray:
    return _session(path).run(None, feeds)[0]


def _inits(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


class _Reader(CalibrationDataReader):
    def __init__(self, make_inputs) -> None:
        self.it = iter([feeds_of(make_inputs(s)) for s in range(3)])

    def get_next(self):
        return next(self.it, None)


def _strip_activation_qdq(src: Path, dst: Path) -> None:
    """Weight-only QDQ: drop QuantizeLinear → DequantizeLinear pairs on activations (weights' DQ stays)."""
    m = onnx.load(str(src))
    producers = {o: n for n in m.graph.node for o in n.output}
    rename, drop = {}, set()
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in producers:
            q = producers[n.input[0]]
            if q.op_type == "QuantizeLinear":
                rename[n.output[0]] = q.input[0]
                drop.update({id(n), id(q)})
    keep = [n for n in m.graph.node if id(n) not in drop]
    for n in keep:
        n.input[:] = [rename.get(i, i) for i in n.input]
    for o in m.graph.output:
        if o.name in rename:
            # Keep the output name: an Identity from the float value.
            keep.append(onnx.helper.make_node("Identity", [rename[o.name]], [o.name]))
    del m.graph.node[:]
    m.graph.node.extend(keep)
    onnx.save(m, str(dst))


def _deq_weights(path: Path) -> dict[str, np.ndarray]:
    """{torch module path: dequantized W (out, in)} of every quantized MatMul weight, by its MatMul's name."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            users = [u for u in m.graph.node if n.output[0] in u.input and u.op_type == "MatMul"]
            if len(users) != 1:
                continue
            q = inits[n.input[0]].astype(np.int32)
            zp = inits[n.input[2]].astype(np.int32) if len(n.input) > 2 else 0
            w = ((q - zp).astype(np.float32) * inits[n.input[1]]).astype(np.float32)
            module = ".".join(s for s in users[0].name.split("/")[2:-1])
            out[module] = w.T
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    base, make_inputs = tiny_llama()
    export_base(base, make_inputs(0), root / "base.onnx")
    return root, base, make_inputs


def _with_weights(base, weights: dict[str, np.ndarray]):
    m = copy.deepcopy(base)
    with torch.no_grad():
        for path, w in weights.items():
            m.get_submodule(path).weight.copy_(torch.from_numpy(w))
    return m


# -- QDQ --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qdq(llama):
    root, base, make_inputs = llama
    full = root / "qdq.onnx"
    quantize_static(
        str(root / "base.onnx"),
        str(full),
        _Reader(make_inputs),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
    )
    weight_only = root / "qdq_w.onnx"
    _strip_activation_qdq(full, weight_only)
    deq = _deq_weights(weight_only)
    assert any(k.endswith("q_proj") for k in deq) and any(k.endswith("down_proj") for k in deq)
    deq_base = _with_weights(base, deq)
    peft_model = peft_reference(deq_base, seed=5, r=4, lora_alpha=8, target_modules=TARGETS)
    peft_model.save_pretrained(str(root / "qdq_adapter"))
    fresh = make_inputs(7)
    base_weights = {k: v.numpy() for k, v in base.state_dict().items()}  # the float checkpoint, not the deq one
    return {
        "full": full,
        "weight_only": weight_only,
        "adapter": root / "qdq_adapter",
        "feeds": feeds_of(fresh),
        "ref": output_of(peft_model, fresh).numpy(),
        "ref_base": output_of(deq_base, fresh).numpy(),
        "base_weights": base_weights,
        "peft": peft_model,
        "root": root,
    }


def test_qdq_inject_is_exact_vs_peft_on_dequantized_weights(qdq):
    out = qdq["root"] / "qdq_inj"
    result = inject_files(qdq["weight_only"], [qdq["adapter"]], out, base_weights=qdq["base_weights"])
    assert len(result.manifest.slots) == 2 * len(TARGETS)  # two layers
    assert {s.op for s in result.manifest.slots.values()} == {"DequantizeLinear"}
    assert {s.dtype for s in result.manifest.slots.values()} == {"float32"}
    sess = _session(out / "model.onnx")
    base_out = _run(qdq["weight_only"], qdq["feeds"])
    assert rel_err(base_out, qdq["ref_base"]) <= TOL  # the weight-only QDQ graph is the dequantized model
    # (b) no adapter: the base exactly.
    assert np.array_equal(sess.run(None, qdq["feeds"])[0], base_out)
    tensors = read_adapter_tensors(out / "qdq_adapter.safetensors")
    y = sess.run(None, {**qdq["feeds"], **tensors})[0]
    assert rel_err(qdq["ref"], qdq["ref_base"]) > 1e-3, "vacuous adapter"
    assert rel_err(y, qdq["ref"]) <= TOL


def test_qdq_with_quantized_activations_adds_the_branch_in_float(qdq):
    out = qdq["root"] / "qdq_full_inj"
    inject_files(qdq["full"], [qdq["adapter"]], out, base_weights=qdq["base_weights"])
    m = onnx.load(str(out / "model.onnx"))
    adds = [n for n in m.graph.node if n.name.endswith("/add")]
    assert len(adds) == 2 * len(TARGETS)  # two layers
    producers = {o: n for n in m.graph.node for o in n.output}
    # After the output's QuantizeLinear → DequantizeLinear: the LoRA term is not rounded to y_scale.
    assert all(producers[a.input[0]].op_type == "DequantizeLinear" for a in adds)
    sess = _session(out / "model.onnx")
    base_out = _run(qdq["full"], qdq["feeds"])
    assert np.array_equal(sess.run(None, qdq["feeds"])[0], base_out)
    y = sess.run(None, {**qdq["feeds"], **read_adapter_tensors(out / "qdq_adapter.safetensors")})[0]
    assert rel_err(y, base_out) > 1e-3


def test_qdq_unresolved_without_base_weights_by_name(qdq, tmp_path):
    # ORT names the DequantizeLinear after the weight (onnx::MatMul_650_DequantizeLinear): no module path.
    res = CliRunner().invoke(cli, ["inject", str(qdq["weight_only"]), str(qdq["adapter"]), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    # With the float checkpoint, each DequantizeLinear is matched by value (dequantized W within scale/2).
    from safetensors.numpy import save_file

    save_file(qdq["base_weights"], str(tmp_path / "base.safetensors"))
    bw = ["--base-weights", str(tmp_path / "base.safetensors")]
    res = CliRunner().invoke(
        cli, ["inject", str(qdq["weight_only"]), str(qdq["adapter"]), "-o", str(tmp_path / "o"), *bw]
    )
    assert res.exit_code == 0, res.output
    merged = tmp_path / "m.onnx"
    res = CliRunner().invoke(
        cli, ["merge", "--requantize", str(qdq["weight_only"]), str(qdq["adapter"]), "-o", str(merged), *bw]
    )
    assert res.exit_code == 0, res.output
    # Merged = PEFT up to the requantization of the merged weights.
    assert rel_err(_run(merged, qdq["feeds"]), qdq["ref"]) < 0.05


def _check_report(report: dict, before: np.ndarray, merged_float: np.ndarray, after: np.ndarray) -> None:
    err = after - merged_float
    delta = merged_float - before
    assert report["requant_max_abs"] == pytest.approx(float(np.abs(err).max()), rel=1e-6)
    assert report["requant_rel_frobenius"] == pytest.approx(
        float(np.linalg.norm(err) / np.linalg.norm(merged_float)), rel=1e-5
    )
    kept = 1 - np.linalg.norm((after - before) - delta) / np.linalg.norm(delta)
    assert report["delta_kept"] == pytest.approx(float(kept), rel=1e-5, abs=1e-6)


def test_qdq_merge_requantizes_and_reports(qdq, tmp_path):
    from lora_export import merge_file

    merged = tmp_path / "merged.onnx"
    result = merge_file(
        qdq["weight_only"],
        qdq["adapter"],
        merged,
        base_weights=qdq["base_weights"],
        only_targets=r"layers\.1\.self_attn\.q_proj$",
        requantize=True,
    )
    before, after = _deq_weights(qdq["weight_only"]), _deq_weights(merged)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed == ["model.layers.1.self_attn.q_proj"]
    inner = qdq["peft"].base_model.model
    mod = inner.get_submodule(changed[0])
    delta = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().numpy() * mod.scaling["default"]
    w = before[changed[0]] + delta
    # The merge report carries what the layout's write cost (the core's generic hook).
    (write,) = [m["write"] for m in result.merged if "write" in m]
    _check_report(write, before[changed[0]], w, after[changed[0]])
    assert write["granularity"] == "per-channel" and write["symmetric"]
    # Requantized as ORT's quantizer does: symmetric int8 per output channel, scale = absmax/127.
    scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    np.testing.assert_allclose(after[changed[0]], np.clip(np.rint(w / scale[:, None]), -127, 127) * scale[:, None])
    print("qdq requant report", write)
    # The merged model is PEFT up to the requantization error.
    y = _run(merged, qdq["feeds"])
    assert np.isfinite(y).all()


def test_qdq_merge_into_float_is_exact(qdq, tmp_path):
    """--into-float: each targeted DequantizeLinear goes, its MatMul reads deq(Wq) + ΔW in float: exact vs PEFT on
    the dequantized weights (QLoRA); untargeted weights stay quantized."""
    from lora_export import merge_file

    merged = tmp_path / "merged.onnx"
    report = merge_file(qdq["weight_only"], qdq["adapter"], merged, base_weights=qdq["base_weights"], into_float=True)
    assert len(report.converted) == 2 * len(TARGETS)
    assert {c["op"] for c in report.converted} == {"DequantizeLinear"} and {c["into"] for c in report.converted}
    ops = [n.op_type for n in onnx.load(str(merged)).graph.node]
    assert ops.count("DequantizeLinear") == len(_deq_weights(qdq["weight_only"])) - 2 * len(TARGETS)
    assert rel_err(_run(merged, qdq["feeds"]), qdq["ref"]) <= TOL


def test_dynamic_into_float_is_refused_in_one_line(llama, tmp_path):
    root, base, _ = llama
    dyn = tmp_path / "dyn.onnx"
    quantize_dynamic(str(root / "base.onnx"), str(dyn), weight_type=QuantType.QInt8)
    peft_reference(base, seed=3, r=2, lora_alpha=4, target_modules=["q_proj"]).save_pretrained(str(tmp_path / "a"))
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["merge", str(dyn), str(tmp_path / "a"), "-o", str(out), "--into-float"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert "--into-float" in res.stderr and "inject" in res.stderr and not out.exists()


# -- dynamic (MatMulInteger) -------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel,weight_type", [(False, QuantType.QInt8), (True, QuantType.QUInt8)])
def test_dynamic_merge_equals_ort_quantizing_the_merged_weights(llama, tmp_path, per_channel, weight_type):
    root, base, make_inputs = llama
    from lora_export import merge_file

    qpath = tmp_path / "dyn.onnx"
    quantize_dynamic(str(root / "base.onnx"), str(qpath), per_channel=per_channel, weight_type=weight_type)
    peft_model = peft_reference(base, seed=6, r=4, lora_alpha=8, target_modules=TARGETS)
    peft_model.save_pretrained(str(tmp_path / "ad"))
    merged = tmp_path / "merged.onnx"
    result = merge_file(qpath, tmp_path / "ad", merged, requantize=True)
    q0, q1 = _inits(qpath), _inits(merged)
    # Independent: write deq(W0) + ΔW into the float model and quantize it with ORT's own quantizer.
    m = onnx.load(str(root / "base.onnx"))
    graph_nodes = {n.name: n for n in onnx.load(str(qpath)).graph.node}
    inner = peft_model.base_model.model
    expected_changed = set()
    for init in m.graph.initializer:
        qname = init.name + "_quantized"
        users = [n for n in graph_nodes.values() if n.op_type == "MatMulInteger" and n.input[1] == qname]
        if len(users) != 1 or not any(f"/{t}/" in users[0].name for t in TARGETS):
            continue
        module = ".".join(users[0].name.split("/")[2:-1])
        mod = inner.get_submodule(module)
        delta = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().numpy() * mod.scaling["default"]
        zp, sc = q0[init.name + "_zero_point"].astype(np.int32), q0[init.name + "_scale"]
        w0 = ((q0[qname].astype(np.int32) - zp) * sc).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array((w0 + delta.T).astype(np.float32), init.name))
        expected_changed.add(qname)
    assert len(expected_changed) == 2 * len(TARGETS)
    onnx.save(m, str(tmp_path / "float_merged.onnx"))
    quantize_dynamic(
        str(tmp_path / "float_merged.onnx"),
        str(tmp_path / "ort.onnx"),
        per_channel=per_channel,
        weight_type=weight_type,
    )
    ort_q = _inits(tmp_path / "ort.onnx")
    for name in expected_changed:
        assert not np.array_equal(q0[name], q1[name]), name
        stem = name[: -len("_quantized")]
        for suffix in ("_quantized", "_scale", "_zero_point"):
            # What ORT's quantizer writes for deq(W0) + ΔW: same scheme, zero point and integers bit for bit; the
            # scale to an ulp or two (ORT computes it in another precision), and per tensor as (1,) or ().
            a, b = q1[stem + suffix], ort_q[stem + suffix]
            assert a.dtype == b.dtype and a.size == b.size, stem + suffix
            if suffix == "_scale":
                np.testing.assert_allclose(a.ravel(), b.ravel(), rtol=1e-6, err_msg=stem + suffix)
            else:
                assert np.array_equal(a.ravel(), b.ravel()), stem + suffix
    report = next(m["write"] for m in result.merged if "write" in m)
    print("dynamic requant report", per_channel, weight_type, report)
    assert report["dtype"] == ("int8" if weight_type == QuantType.QInt8 else "uint8")
    assert 0.0 <= report["requant_max_abs"] and report["requant_rel_frobenius"] < 0.05


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


def _ort_optimized(src: Path, dst: Path) -> set[str]:
    """The model as ORT's optimizer saves it (fused com.microsoft ops); returns its op types."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(dst)).graph.node}


def _dynamic_net(tmp_path: Path, fused: bool) -> tuple[torch.nn.Module, torch.Tensor, Path]:
    """_Net, its input, and the path of its dynamic int8 quantization (optionally as ORT's optimizer saves it)."""
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(3, 16)
    export_base(net, {"x": x}, tmp_path / "base.onnx")
    quantize_dynamic(str(tmp_path / "base.onnx"), str(tmp_path / "q.onnx"), per_channel=True)
    qpath = tmp_path / "q.onnx"
    if fused:
        qpath = tmp_path / "q_opt.onnx"
        ops = _ort_optimized(tmp_path / "q.onnx", qpath)
        assert "MatMulInteger" not in ops and ops & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}, ops
    return net, x, qpath


def _probe_layer_input(injected: Path, probe: Path) -> None:
    """A copy of the injected model that also outputs the LoRA branch's input h (the layer's float input)."""
    m = onnx.load(str(injected))
    lora_a = next(n for n in m.graph.node if n.name.endswith("/lora_A"))
    m.graph.output.append(onnx.helper.make_tensor_value_info(lora_a.input[0], onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(probe))


@pytest.mark.parametrize("fused", [False, True])
def test_dynamic_inject_branch_contribution_is_x_delta(tmp_path, fused):
    net, x, qpath = _dynamic_net(tmp_path, fused)
    op = "MatMulInteger"
    peft_model = peft_reference(net, seed=3, r=2, lora_alpha=4, target_modules=["out"])
    peft_model.save_pretrained(str(tmp_path / "ad"))
    result = inject_files(qpath, [tmp_path / "ad"], tmp_path / "inj")
    (slot,) = result.manifest.slots.values()
    assert slot.op == op or fused
    sess = _session(tmp_path / "inj" / "model.onnx")
    feeds = {"x": x.numpy()}
    # The layer's input h = relu(fc(x)) as the quantized graph computes it: read it as an extra output.
    _probe_layer_input(tmp_path / "inj" / "model.onnx", tmp_path / "probe.onnx")
    no_adapter, h = _session(tmp_path / "probe.onnx").run(None, feeds)
    assert np.array_equal(no_adapter, _run(qpath, feeds))  # (b) exact base
    tensors = read_adapter_tensors(tmp_path / "inj" / "ad.safetensors")
    with_adapter = sess.run(None, {**feeds, **tensors})[0]
    mod = peft_model.base_model.model.out
    delta = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().numpy() * mod.scaling["default"]
    expected = h @ delta.T
    assert np.abs(expected).max() > 1e-3
    assert rel_err(with_adapter - no_adapter, expected) <= 1e-4  # the difference of two outputs: fp32 cancellation


@pytest.mark.parametrize("fused", [False, True])
def test_dynamic_inject_dora_scales_the_branch_and_not_the_bias(tmp_path, fused):
    net, x, qpath = _dynamic_net(tmp_path, fused)
    peft_model = peft_reference(net, seed=3, r=2, lora_alpha=4, target_modules=["out"], use_dora=True)
    peft_model.save_pretrained(str(tmp_path / "ad"))
    inject_files(qpath, [tmp_path / "ad"], tmp_path / "inj")
    _probe_layer_input(tmp_path / "inj" / "model.onnx", tmp_path / "probe.onnx")
    feeds = {"x": x.numpy()}
    no_adapter, h = _session(tmp_path / "probe.onnx").run(None, feeds)
    assert np.array_equal(no_adapter, _run(qpath, feeds))
    y = _session(tmp_path / "inj" / "model.onnx").run(
        None, {**feeds, **read_adapter_tensors(tmp_path / "inj" / "ad.safetensors")}
    )[0]
    # PEFT's DoRA on the dequantized base W0: g/‖W0 + ΔW‖ ⊙ (W0·h + ΔW·h) + b, with W0·h as the graph computes it.
    mod = peft_model.base_model.model.out
    delta = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().numpy() * mod.scaling["default"]
    inits = _inits(qpath)
    stem = next(k for k in inits if k.endswith("_quantized") and inits[k].shape == (8, 8))[: -len("_quantized")]
    q, sc, zp = (inits[stem + s] for s in ("_quantized", "_scale", "_zero_point"))
    w0 = ((q.astype(np.int32) - zp.astype(np.int32)) * sc).astype(np.float32).T
    g = mod.lora_magnitude_vector["default"].weight.detach().numpy().reshape(-1)
    norm = g / np.linalg.norm(w0 + delta, axis=1)
    bias = net.out.bias.detach().numpy()
    expected = norm * (no_adapter - bias + h @ delta.T) + bias
    assert rel_err(y, expected) <= 1e-4


def test_fused_dynamic_merge_equals_unfused_merge(llama, tmp_path):
    root, base, _ = llama
    from lora_export import merge_file

    qpath = tmp_path / "dyn.onnx"
    quantize_dynamic(str(root / "base.onnx"), str(qpath), per_channel=True)
    ops = _ort_optimized(qpath, tmp_path / "opt.onnx")
    assert {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} <= ops
    peft_reference(base, seed=4, r=4, lora_alpha=8, target_modules=TARGETS).save_pretrained(str(tmp_path / "ad"))
    merge_file(qpath, tmp_path / "ad", tmp_path / "m.onnx", requantize=True)
    merge_file(tmp_path / "opt.onnx", tmp_path / "ad", tmp_path / "m_opt.onnx", requantize=True)
    q0, a, b = _inits(qpath), _inits(tmp_path / "m.onnx"), _inits(tmp_path / "m_opt.onnx")
    changed = [k for k in q0 if k.endswith("_quantized") and k in a and not np.array_equal(q0[k], a[k])]
    assert len(changed) == 2 * len(TARGETS)
    for k in changed:
        stem = k[: -len("_quantized")]
        for suffix in ("_quantized", "_scale", "_zero_point"):
            assert np.array_equal(a[stem + suffix], b[stem + suffix]), stem + suffix


def test_cli_merge_and_inject_dynamic(llama, tmp_path):
    root, base, _ = llama
    qpath = tmp_path / "dyn.onnx"
    quantize_dynamic(str(root / "base.onnx"), str(qpath))
    peft_reference(base, seed=2, r=2, lora_alpha=4, target_modules=["q_proj"]).save_pretrained(str(tmp_path / "ad"))
    runner = CliRunner()
    res = runner.invoke(
        cli, ["merge", "--requantize", str(qpath), str(tmp_path / "ad"), "-o", str(tmp_path / "m.onnx")]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["inject", str(qpath), str(tmp_path / "ad"), "-o", str(tmp_path / "inj"), "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "inj" / "model.onnx").is_file()


def test_shared_quantized_weight_is_refused_in_one_line(tmp_path):
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(16, 16, bias=False)
            self.fc2 = torch.nn.Linear(16, 16, bias=False)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    net = Two().eval()
    export_base(net, {"x": torch.randn(2, 16)}, tmp_path / "base.onnx")
    quantize_dynamic(str(tmp_path / "base.onnx"), str(tmp_path / "q.onnx"))
    # A deduplicating tool made fc2 read fc1's quantized weight (and scale, zero point).
    q = onnx.load(str(tmp_path / "q.onnx"))
    fc1, fc2 = (
        next(n for n in q.graph.node if n.op_type == "MatMulInteger" and f"/{m}/" in n.name) for m in ("fc1", "fc2")
    )
    fc2.input[1], fc2.input[3] = fc1.input[1], fc1.input[3]
    onnx.save(q, str(tmp_path / "shared.onnx"))
    peft_reference(net, seed=2, r=2, lora_alpha=4, target_modules=["fc1"]).save_pretrained(str(tmp_path / "ad"))
    runner = CliRunner()
    for cmd in (["merge", "--requantize", "-o", str(tmp_path / "m.onnx")], ["inject", "-o", str(tmp_path / "inj")]):
        res = runner.invoke(cli, [cmd[0], str(tmp_path / "shared.onnx"), str(tmp_path / "ad"), *cmd[1:]])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1 and "shared" in res.output, res.output
        print(res.output.strip())
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "inj").exists()


def test_entry_point_declared():
    # Installed metadata is the main checkout's: read the declaration itself (tomllib is Python 3.11+).
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    table = re.search(r'^\[project\.entry-points\."lora_export\.op_layouts"\]\n((?:[^\[\n].*\n)*)', text, re.M)
    assert table is not None
    assert re.search(r'^int8 = "lora_export_plugins\.int8:register"$', table.group(1), re.M)
    module, func = "lora_export_plugins.int8", "register"
    import importlib

    assert callable(getattr(importlib.import_module(module), func))

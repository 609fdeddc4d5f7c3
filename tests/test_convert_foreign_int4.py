"""convert for Olive-style int4 LoRA models: each branch is ``MatMulNBits(MatMulNBits(x, A_q), B_q)`` with A_q/B_q
(codes, scales, zero points) as graph inputs, the rank fixed by the ops' N/K attributes, Olive's odd symbolic dims
and zero-size defaults (which ONNX Runtime 1.31 cannot run), optionally a Mul by the first adapter's scale.

References: the float branch recomputed from the written tensors dequantized here (the model computes what we
quantized), ONNX Runtime's own quantizer on the same float matrices (bit for bit), and PEFT (the deviation is
exactly the reported ΔW error).
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

D_IN, D_Q, D_V = 40, 24, 16  # K = 40 with block 16: a padded last block
BLOCK, RANK = 16, 5  # the graph's fixed rank; B's K = 5 < block: padded too
GRAPH_SCALE = 2.0
PROJ = {"q_proj": D_Q, "v_proj": D_V}


@pytest.fixture(scope="module", autouse=True)
def plugin():
    from lora_export_plugins import int4

    int4.register()
    return int4


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The base, a PEFT adapter r=3 alpha=7 (scale 2.33, not the graph's 2.0), a q-only r=5 adapter, outputs."""
    root = tmp_path_factory.mktemp("foreign_int4")
    base = qv_model(D_IN, D_Q, D_V, seed=3).eval()
    x = torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(5))
    peft = saved_peft_reference(base, root / "r3a7", r=3, lora_alpha=7, target_modules=["q_proj", "v_proj"])
    q_only = saved_peft_reference(base, root / "q5", seed=2, r=5, lora_alpha=5, target_modules=["q_proj"])
    with torch.no_grad():
        refs = {"r3a7": peft(x).numpy(), "q5": q_only(x).numpy(), "base": base(x).numpy()}
    return base, x.numpy(), refs, root, {"r3a7": peft, "q5": q_only}


def _names(mod: str, ab: str, naming: str) -> list[str]:
    if naming == "genai":  # the genai builder's names, kept by olive generate-adapter
        return [
            f"{mod}.lora_{ab}.MatMul.weight_Q4",
            f"{mod}.lora_{ab}.MatMul.weight_scales",
            f"{mod}.lora_{ab}.MatMul.weight_zp",
        ]
    return [f"{mod}.lora_{ab}.quant.weight", f"{mod}.lora_{ab}.quant.scale", f"{mod}.lora_{ab}.quant.zero_point"]


def _int4_graph(base, path, *, naming="genai", symmetric=True, scale=None, where="out", lora=True, flat_scales=False):
    """y = x·Wᵀ (+ bias) [+ [s·] MatMulNBits(MatMulNBits(x, A_q), B_q)] per module, float base."""
    attn_name = "attn" if naming == "genai" else "self_attn"
    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D_IN])]
    outs = []
    for proj, out_f in PROJ.items():
        lin = getattr(base.model.layers[0].self_attn, proj)
        mod = f"model.layers.0.{attn_name}.{proj}"
        inits.append(numpy_helper.from_array(lin.weight.detach().numpy().T.copy(), f"{mod}.w"))
        nodes.append(helper.make_node("MatMul", ["x", f"{mod}.w"], [f"{mod}/base"]))
        base_out = f"{mod}/base"
        if lin.bias is not None:
            inits.append(numpy_helper.from_array(lin.bias.detach().numpy(), f"{mod}.bias"))
            nodes.append(helper.make_node("Add", [base_out, f"{mod}.bias"], [f"{mod}/biased"]))
            base_out = f"{mod}/biased"
        if not lora:
            outs.append(base_out)
            continue
        h = "x"
        for ab, (n, k) in (("A", (RANK, D_IN)), ("B", (out_f, RANK))):
            nb = -(-k // BLOCK)
            q4, sc, zp = _names(mod, ab, naming)
            # Olive marks the "rank" dim where float LoRA has it: A (N, lora_r, blob), B (lora_r, n_blocks, blob).
            q_shape = [n, "lora_r", BLOCK // 2] if ab == "A" else ["lora_r", nb, BLOCK // 2]
            s_shape = ([n * nb] if flat_scales else [n, "lora_r"]) if ab == "A" else ["lora_r", nb]
            specs = [(q4, TensorProto.UINT8, q_shape), (sc, TensorProto.FLOAT, s_shape)]
            if not symmetric:
                specs.append((zp, TensorProto.UINT8, [n, (nb + 1) // 2] if ab == "A" else ["lora_r", (nb + 1) // 2]))
            for name, dtype, shape in specs:
                inputs.append(helper.make_tensor_value_info(name, dtype, shape))
                zero = [0 if isinstance(d, str) else d for d in shape]  # Olive's zero-size defaults
                np_dtype = np.uint8 if dtype == TensorProto.UINT8 else np.float32
                inits.append(numpy_helper.from_array(np.zeros(zero, np_dtype), name))
            out = f"{mod}/lora_{ab}/out"
            nodes.append(
                helper.make_node(
                    "MatMulNBits", [h, *[s[0] for s in specs]], [out], domain="com.microsoft",
                    name=f"/{mod}/lora_{ab}/MatMul_Q4", K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=0,
                )
            )  # fmt: skip
            h = out
            if scale is not None and ab == ("A" if where == "mid" else "B"):
                inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{mod}/s{ab}"))
                nodes.append(helper.make_node("Mul", [h, f"{mod}/s{ab}"], [f"{h}/scaled"]))
                h = f"{h}/scaled"
        nodes.append(helper.make_node("Add", [base_out, h], [f"{mod}/y"]))
        outs.append(f"{mod}/y")
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=-1))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8
    )
    onnx.save(model, str(path))
    return path


def _run(model, x, tensors: dict | None = None) -> np.ndarray:
    """ORT with the tensors fed directly (its adapter API checks inputs only after the zero-size defaults)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, **(tensors or {})})[0]


def _nibbles(packed: np.ndarray, rows: int) -> np.ndarray:
    p = packed.reshape(rows, -1)
    return np.stack([p & 15, p >> 4], axis=-1).reshape(rows, -1)


def _deq(tensors: dict, names: list[str], n: int, k: int) -> np.ndarray:
    """MatMulNBits' weight (N, K) from its packed tensors, written out independently of the plugin."""
    nb = -(-k // BLOCK)
    codes = _nibbles(tensors[names[0]], n).astype(np.int64)
    scales = tensors[names[1]].reshape(n, nb).astype(np.float64)
    zp = _nibbles(tensors[names[2]], n)[:, :nb].astype(np.int64) if names[2] in tensors else np.full((n, nb), 8)
    return ((codes - np.repeat(zp, BLOCK, 1)) * np.repeat(scales, BLOCK, 1))[:, :k]


def _peft_ab(peft, proj: str) -> tuple[np.ndarray, np.ndarray, float]:
    layer = getattr(peft.base_model.model.model.layers[0].self_attn, proj)
    a, b = layer.lora_A["default"].weight.detach().double().numpy(), layer.lora_B["default"].weight.detach().double()
    return a, b.numpy(), float(layer.scaling["default"])


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    ("naming", "symmetric", "scale", "where", "flat"),
    [
        ("genai", True, None, "out", False),
        ("genai", True, GRAPH_SCALE, "out", True),
        ("olive", False, GRAPH_SCALE, "mid", False),
        ("olive", False, None, "out", True),
    ],
)
def test_requantized_adapter_is_what_we_report(case, tmp_path, naming, symmetric, scale, where, flat):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    base, x, refs, root, pefts = case
    model = _int4_graph(base, tmp_path / "m.onnx", naming=naming, symmetric=symmetric, scale=scale, where=where,
                        flat_scales=flat)  # fmt: skip
    out = tmp_path / "r3a7.onnx_adapter"
    report = convert_adapter(root / "r3a7", model, out, requantize=True)
    tensors = read_adapter_tensors(out)
    assert report["foreign"] and len(report["slots_filled"]) == 2 and len(report["requantized"]) == 2
    gs = 1.0 if scale is None else scale
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=symmetric))
    ours = _run(model, x, tensors)
    expected_from_q, expected_peft = refs["base"].astype(np.float64).copy(), refs["base"].astype(np.float64).copy()
    col = 0
    for proj, out_f in PROJ.items():
        mod = f"model.layers.0.{'attn' if naming == 'genai' else 'self_attn'}.{proj}"
        a, b, s = _peft_ab(pefts["r3a7"], proj)
        # The float matrices our A′/B′ come from: A padded to the graph's rank 5, B·(s/s_graph) padded.
        a_f = np.zeros((RANK, D_IN))
        a_f[:3] = a
        b_f = np.zeros((out_f, RANK))
        b_f[:, :3] = b * (s / gs)
        for ab, w, n, k in (("A", a_f, RANK, D_IN), ("B", b_f, out_f, RANK)):
            names = _names(mod, ab, naming)
            packed, sc, zp = quantizer.qbits_block_quant(np.ascontiguousarray(w.astype(np.float32).T))
            # Every code the op reads; past K ORT's quantizer leaves stale nibbles (never read), we write 0.
            np.testing.assert_array_equal(_nibbles(tensors[names[0]], n)[:, :k], _nibbles(packed, n)[:, :k])
            assert tensors[names[0]].size == packed.size and not _nibbles(tensors[names[0]], n)[:, k:].any()
            np.testing.assert_array_equal(tensors[names[1]].reshape(sc.shape), sc)
            assert tensors[names[1]].dtype == np.float32 and tensors[names[0]].dtype == np.uint8
            if symmetric:
                assert names[2] not in tensors
            else:
                np.testing.assert_array_equal(tensors[names[2]].reshape(zp.shape), zp)
        deq_a, deq_b = (
            _deq(tensors, _names(mod, "A", naming), RANK, D_IN),
            _deq(tensors, _names(mod, "B", naming), out_f, RANK),
        )
        dw_q, dw = gs * deq_b @ deq_a, s * b @ a
        sl = slice(col, col + out_f)
        expected_from_q[..., sl] += x.astype(np.float64) @ dw_q.T
        expected_peft[..., sl] += x.astype(np.float64) @ dw.T
        col += out_f
        # The reported error is the effective ΔW's against the float one.
        err = report["requantized"][mod]
        assert err["max_abs_error"] == pytest.approx(np.abs(dw_q - dw).max(), rel=1e-5)
        assert err["rel_frobenius_error"] == pytest.approx(np.linalg.norm(dw_q - dw) / np.linalg.norm(dw), rel=1e-5)
        assert 1e-4 < err["rel_frobenius_error"] < 0.3
        assert err["scheme"] == f"MatMulNBits int4 block {BLOCK} {'symmetric' if symmetric else 'asymmetric'}"
    # The model computes exactly what we quantized; its distance from PEFT is the reported error.
    assert _rel(ours, expected_from_q) <= 1e-5
    assert _rel(expected_peft, refs["r3a7"]) <= 1e-5
    assert _rel(ours - refs["r3a7"], expected_from_q - expected_peft) <= 1e-3
    assert 1e-4 < _rel(ours, refs["r3a7"]) < 0.1


def test_without_requantize_refused_in_one_line(case, tmp_path):
    base, _x, _refs, root, _ = case
    model = _int4_graph(base, tmp_path / "m.onnx")
    out = tmp_path / "o.onnx_adapter"
    with pytest.raises(TargetError, match="--requantize"):
        convert_adapter(root / "r3a7", model, out)
    res = CliRunner().invoke(cli, ["convert", str(root / "r3a7"), "--model", str(model), "-o", str(out)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "int4 block 16 symmetric" in res.output and not out.exists()
    assert list(tmp_path.iterdir()) == [model]


def test_subset_and_zero_adapters_add_exactly_nothing(case, tmp_path):
    base, x, refs, root, _ = case
    model = _int4_graph(base, tmp_path / "m.onnx", scale=GRAPH_SCALE)
    plain = _run(_int4_graph(base, tmp_path / "plain.onnx", lora=False), x)
    # q only, full rank 5: v gets quantized zeros, and its outputs are the base's bit for bit.
    out = tmp_path / "q.safetensors"
    args = ["convert", str(root / "q5"), "--model", str(model), "-o", str(out), "--requantize"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "requantized 1 slots" in res.output, res.output
    got = _run(model, x, read_adapter_tensors(out))
    np.testing.assert_array_equal(got[..., D_Q:], plain[..., D_Q:])
    assert _rel(got, refs["q5"]) < 0.1 and _rel(refs["q5"], refs["base"]) > 0.1
    # --zero: the whole model is its base, bit for bit (the zero-size defaults themselves do not run on ORT 1.31).
    zero = tmp_path / "zero.onnx_adapter"
    res = CliRunner().invoke(cli, ["convert", "--zero", "--model", str(model), "-o", str(zero), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["slots_zeroed"] == ["model.layers.0.attn.q_proj", "model.layers.0.attn.v_proj"]
    np.testing.assert_array_equal(_run(model, x, read_adapter_tensors(zero)), plain)
    sess_opts = ort.SessionOptions()
    sess_opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), sess_opts, providers=["CPUExecutionProvider"])
    ro = ort.RunOptions()
    adapter = ort.LoraAdapter()
    adapter.Load(str(zero))
    ro.add_active_adapter(adapter)
    np.testing.assert_array_equal(sess.run(None, {"x": x}, ro)[0], plain)
    res = CliRunner().invoke(cli, ["convert", str(root / "q5"), "--zero", "--model", str(model), "-o", str(zero)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1


def _edit(path, fn):
    model = onnx.load(str(path))
    fn(model.graph)
    onnx.save(model, str(path))
    return path


def test_refusals(case, tmp_path):
    base, _x, _refs, root, _ = case
    out = tmp_path / "o.onnx_adapter"
    # rank 6 > the ops' fixed rank 5
    saved_peft_reference(base, tmp_path / "r6", r=6, lora_alpha=6, target_modules=["q_proj"])
    with pytest.raises(ShapeError, match="exceeds the model's fixed rank 5"):
        convert_adapter(tmp_path / "r6", _int4_graph(base, tmp_path / "m.onnx"), out, requantize=True)

    def scales_constant(g):  # only the codes are inputs: the scales cannot be replaced by an adapter file
        keep = [i for i in g.input if not i.name.endswith("q_proj.lora_B.MatMul.weight_scales")]
        del g.input[:]
        g.input.extend(keep)

    with pytest.raises(ModelError, match="not LoRA graph inputs"):
        convert_adapter(
            root / "r3a7", _edit(_int4_graph(base, tmp_path / "c.onnx"), scales_constant), out, requantize=True
        )

    def relu_between(g):  # Relu(x·Aᵀ) into B: not a LoRA branch
        n = next(n for n in g.node if n.name.endswith("q_proj/lora_B/MatMul_Q4"))
        g.node.append(helper.make_node("Relu", [n.input[0]], ["relu"]))
        n.input[0] = "relu"

    with pytest.raises(ModelError, match="unknown layout"):
        convert_adapter(
            root / "r3a7", _edit(_int4_graph(base, tmp_path / "b.onnx"), relu_between), out, requantize=True
        )
    assert not out.exists()

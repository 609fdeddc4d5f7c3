"""``inject --per-row`` through the op plugins, on graphs ONNX Runtime's own tools wrote:

- FusedMatMul (ORT's extended optimization of a LLaMA whose linears are MatMul(x, Transpose(W))): every row
  against PEFT with that row's adapter alone, rows without adapter bit-identical to the fused file;
- int8 QDQ from ``quantize_static``: weight-only, every row against PEFT alone on the dequantized weights;
  with quantized activations (calibrated constant scales), every row equal to that row run alone;
- int8 from ``quantize_dynamic`` (MatMulInteger) and as ORT's optimizer saves it (DynamicQuantizeMatMul):
  activations are quantized at run time with one scale for the whole tensor, so no float reference is
  exact; each row's LoRA contribution, per-row model − base, is checked against x_i·ΔW_iᵀ of its own adapter
  (x_i: the layer's float input as the graph computes it), and rows without adapter equal the base file;
- ORT's transformer optimizer on a tiny BERT: fused ``Attention`` takes one computed weight for the whole
  batch and is refused in one line naming it; ``MultiHeadAttention`` keeps the q/k/v MatMuls and takes
  per-row adapters, every row against PEFT alone.
(int4 ``MatMulNBits`` and packed q/k/v: tests/test_per_row.py and tests/test_per_row_genai.py.)"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import output_of
from inject_fixtures import export_base, feeds_of
from per_row_fixtures import cli_run, cpu_session, rel, saved_peft_adapters
from safetensors.numpy import save_file

from lora_export.graph.slots.per_row import IDS_INPUT


def _pool(folder, rows) -> dict[str, np.ndarray]:
    """pool.safetensors and the ids of ``rows`` (adapter names or None), as plain ORT users feed them."""
    from test_per_row import _pool_feeds

    pool, ids_of = _pool_feeds(folder)
    return {**pool, IDS_INPUT: np.array([ids_of[r] if r else 0 for r in rows], dtype=np.int64)}


def _batch(make_inputs, seeds) -> dict[str, torch.Tensor]:
    """Fresh inputs of several seeds as one batch."""
    parts = [make_inputs(s) for s in seeds]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _check_rows_vs_peft(got, base_out, inputs, rows, peft) -> float:
    """Row i against PEFT with row i's adapter alone; rows without adapter bit-identical to the base."""
    worst = 0.0
    for i, row in enumerate(rows):
        if row is None:
            np.testing.assert_array_equal(got[i], base_out[i])
            continue
        ref = output_of(peft[row], {k: v[i : i + 1] for k, v in inputs.items()}).numpy()[0]
        err = rel(got[i], ref)
        assert err <= 1e-5, (i, row, err)
        assert rel(got[i], base_out[i]) > 1e-3, (i, row)  # the adapter matters: not vacuous
        worst = max(worst, err)
    return worst


# -- FusedMatMul ------------------------------------------------------------------------------------


def test_fused_matmul_rows_equal_peft_alone(tmp_path):
    from collections import Counter

    import onnx
    from lora_export_plugins import fused_matmul
    from models import tiny_llama
    from test_plugin_fused_matmul import _untranspose

    fused_matmul.register()
    base, make_inputs = tiny_llama()
    export_base(base, make_inputs(0), tmp_path / "plain.onnx")
    _untranspose(tmp_path / "plain.onnx", tmp_path / "transposed.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(
        str(tmp_path / "transposed.onnx"),
        so,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["ConstantFolding"],
    )
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node)
    assert ops["FusedMatMul"] >= 2 * 7 and ops["MatMul"] <= 2  # the linears really are fused
    adapters = {
        "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "down": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], use_rslora=True),
        "dora": dict(r=3, lora_alpha=6, target_modules=["o_proj", "up_proj"], use_dora=True),
    }
    peft = saved_peft_adapters(tmp_path, base, adapters, seed=100)
    names = [f"{n}={tmp_path / n}" for n in adapters]
    code, _, err = cli_run("inject", tmp_path / "fused.onnx", *names, "-o", tmp_path / "rows", "--per-row")
    assert code == 0, err
    rows = ["down", None, "qv", "dora", None, "qv"]
    inputs = _batch(make_inputs, [7, 8, 9])
    got = cpu_session(tmp_path / "rows" / "model.onnx").run(
        None, {**feeds_of(inputs), **_pool(tmp_path / "rows", rows)}
    )
    base_out = cpu_session(tmp_path / "fused.onnx").run(None, feeds_of(inputs))
    _check_rows_vs_peft(got[0], base_out[0], inputs, rows, peft)


# -- int8: quantize_dynamic -------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 12)
        self.out = torch.nn.Linear(12, 8)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


@pytest.mark.parametrize("fused", [False, True], ids=["MatMulInteger", "DynamicQuantizeMatMul"])
def test_dynamic_int8_rows_add_their_own_adapter(tmp_path, fused):
    """Adapters on ``out`` only: an adapter upstream would change the whole batch's activation scale there
    (dynamic quantization couples the rows of a batch already in the base model)."""
    import onnx
    from lora_export_plugins import int8
    from onnxruntime.quantization import quantize_dynamic
    from test_plugin_int8 import _ort_optimized

    int8.register()
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(5, 3, 16)
    export_base(net, {"x": x[:1]}, tmp_path / "base.onnx")
    quantize_dynamic(str(tmp_path / "base.onnx"), str(tmp_path / "q.onnx"), per_channel=True)
    qpath = tmp_path / "q.onnx"
    if fused:
        qpath = tmp_path / "q_opt.onnx"
        ops = _ort_optimized(tmp_path / "q.onnx", qpath)
        assert "MatMulInteger" not in ops and "DynamicQuantizeMatMul" in ops, ops
    adapters = {
        "r2": dict(r=2, lora_alpha=4, target_modules=["out"]),
        "r3": dict(r=3, lora_alpha=3, target_modules=["out"], use_rslora=True),
    }
    peft = saved_peft_adapters(tmp_path, net, adapters, seed=110)
    names = [f"{n}={tmp_path / n}" for n in adapters]
    code, _, err = cli_run("inject", qpath, *names, "-o", tmp_path / "rows", "--per-row")
    assert code == 0, err
    # The layer's float input h as the quantized graph computes it: the branch's input, read as an output.
    model = onnx.load(str(tmp_path / "rows" / "model.onnx"))
    lora_a = next(n for n in model.graph.node if n.name.endswith("/lora_A"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(lora_a.input[0], onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(tmp_path / "rows" / "probe.onnx"))
    rows = ["r3", None, "r2", "r3", None]
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # the graph as written (no int8 refusion)
    sess = cpu_session(tmp_path / "rows" / "probe.onnx", basic)
    got, h = sess.run(None, {"x": x.numpy(), **_pool(tmp_path / "rows", rows)})
    base_out = cpu_session(qpath, basic).run(None, {"x": x.numpy()})[0]
    for i, row in enumerate(rows):
        if row is None:
            np.testing.assert_array_equal(got[i], base_out[i])
            continue
        mod = peft[row].base_model.model.out
        delta = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach().numpy()
        expected = h[i] @ (delta * mod.scaling["default"]).T
        assert np.abs(expected).max() > 1e-3
        assert rel(got[i] - base_out[i], expected) <= 1e-4, (i, row)  # a difference of outputs: fp32 cancellation


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    """A tiny LLaMA through ``quantize_static`` (QDQ, per channel): the full graph (activations quantized with
    calibrated constant scales) and its weight-only form, with adapters trained on the dequantized weights."""
    from lora_export_plugins import int8
    from models import tiny_llama
    from onnxruntime.quantization import QuantFormat, quantize_static
    from test_plugin_int8 import _deq_weights, _Reader, _strip_activation_qdq, _with_weights

    int8.register()
    root = tmp_path_factory.mktemp("per-row-qdq")
    base, make_inputs = tiny_llama()
    export_base(base, make_inputs(0), root / "base.onnx")
    quantize_static(
        str(root / "base.onnx"), str(root / "full.onnx"), _Reader(make_inputs), quant_format=QuantFormat.QDQ,
        per_channel=True, op_types_to_quantize=["MatMul"],
    )  # fmt: skip
    _strip_activation_qdq(root / "full.onnx", root / "weight_only.onnx")
    deq = _with_weights(base, _deq_weights(root / "weight_only.onnx"))
    save_file({k: v.detach().numpy().copy() for k, v in base.state_dict().items()}, str(root / "w.safetensors"))
    adapters = {
        "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "down": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], use_rslora=True),
    }
    return root, make_inputs, saved_peft_adapters(root, deq, adapters, seed=130)


@pytest.mark.parametrize("graph", ["weight_only", "full"])
def test_qdq_int8_rows(qdq, tmp_path, graph):
    """Weight-only QDQ computes the dequantized model: rows against PEFT alone on it. With quantized
    activations (static scales: rows stay independent) no float reference is exact: each row of the mixed
    batch equals that row run alone with its adapter."""
    root, make_inputs, peft = qdq
    names = [f"{n}={root / n}" for n in peft]
    code, _, err = cli_run(
        "inject", root / f"{graph}.onnx", *names, "-o", tmp_path / "rows", "--per-row",
        "--base-weights", root / "w.safetensors",  # ORT names the DequantizeLinear nodes after the weights
    )  # fmt: skip
    assert code == 0, err
    rows = ["down", None, "qv", "down"]
    inputs = _batch(make_inputs, [11, 12])
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # extended would fuse DQ → MatMul into MatMulNBits
    sess = cpu_session(tmp_path / "rows" / "model.onnx", basic)
    pool = _pool(tmp_path / "rows", rows)
    got = sess.run(None, {**feeds_of(inputs), **pool})[0]
    base_out = cpu_session(root / f"{graph}.onnx", basic).run(None, feeds_of(inputs))[0]
    if graph == "weight_only":
        _check_rows_vs_peft(got, base_out, inputs, rows, peft)
        return
    for i, row in enumerate(rows):
        if row is None:
            np.testing.assert_array_equal(got[i], base_out[i])
            continue
        one = {k: v[i : i + 1] for k, v in feeds_of(inputs).items()}
        alone = sess.run(None, {**one, **pool, IDS_INPUT: pool[IDS_INPUT][i : i + 1]})[0]
        assert rel(got[i], alone[0]) <= 1e-5 and rel(got[i], base_out[i]) > 1e-3, (i, row)


# -- ORT's transformer optimizer: Attention refused, MultiHeadAttention per row ---------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from lora_export_plugins import attention
    from models import tiny_bert
    from test_plugin_attention import _optimize

    attention.register()
    root = tmp_path_factory.mktemp("per-row-bert")
    base, make_inputs = tiny_bert()
    export_base(base, make_inputs(0), root / "plain.onnx")
    _optimize(root / "plain.onnx", root / "attn.onnx", mha=False)
    _optimize(root / "plain.onnx", root / "mha.onnx", mha=True)
    save_file({k: v.detach().numpy().copy() for k, v in base.state_dict().items()}, str(root / "w.safetensors"))
    adapters = {
        "qvd": dict(r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"]),  # not the pooler (2-D)
        "v3": dict(r=3, lora_alpha=3, target_modules=["value"]),
        "kd": dict(r=2, lora_alpha=4, target_modules=["key", "intermediate.dense"], use_rslora=True),
    }
    return root, make_inputs, saved_peft_adapters(root, base, adapters, seed=120)


def test_fused_attention_is_refused_naming_the_op(bert, tmp_path):
    root, _, peft = bert
    out = tmp_path / "rows"
    code, _, err = cli_run(
        "inject", root / "attn.onnx", *(f"{n}={root / n}" for n in peft), "-o", out, "--per-row",
        "--base-weights", root / "w.safetensors",
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Attention 'Attention_" in err and "without --per-row" in err and "MultiHeadAttention" in err
    assert not out.exists()


def test_multi_head_attention_rows_equal_peft_alone(bert, tmp_path):
    root, make_inputs, peft = bert
    out = tmp_path / "rows"
    code, _, err = cli_run("inject", root / "mha.onnx", *(f"{n}={root / n}" for n in peft), "-o", out, "--per-row")
    assert code == 0, err
    rows = ["qvd", "kd", None, "v3", "qvd", None]  # seeds' row 1 is padded: padding is covered per adapter
    inputs = _batch(make_inputs, [5, 6, 7])
    got = cpu_session(out / "model.onnx").run(None, {**feeds_of(inputs), **_pool(out, rows)})[0]
    base_out = cpu_session(root / "mha.onnx").run(None, feeds_of(inputs))[0]
    _check_rows_vs_peft(got, base_out, inputs, rows, peft)

"""A target is "absent" (skipped, exit 0) only with proof; packed, fused, quantized or renamed projections
are refused with a line that names the target and the likely cause. Graphs from real tools where
installed in the suite (ONNX Runtime's transformer optimizer and quantizer), else built by hand."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, saved_peft_reference
from foreign_graphs import packed_attention, run_plain
from inject_fixtures import feeds_of
from models import tiny_bert
from onnx_fixtures import export_onnx
from safetensors.numpy import save_file
from torch import nn

from lora_export import export, merge_file
from lora_export.cli import cli
from lora_export.errors import TargetError


def _merge(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, ["merge", *map(str, args)])
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-ort")
    base, make_inputs = tiny_bert()
    plain = export_onnx(base, make_inputs(0), root / "bert.onnx", dynamo=False)
    weights = root / "base.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in base.state_dict().items()}, str(weights))
    adapter = root / "adapter"
    peft_model = saved_peft_reference(base, adapter, r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
    return base, make_inputs, plain, weights, adapter, peft_model


def _fused_attention(bert_module, path) -> None:
    """ONNX Runtime's fused BERT attention (what its optimizer makes with an older exporter's pattern):
    one com.microsoft ``Attention`` node whose weight packs query, key and value side by side."""
    layer = bert_module.encoder.layer[0].attention
    sa = layer.self
    packed = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]).detach().numpy().T.copy()
    bias = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]).detach().numpy().copy()
    dense = layer.output.dense.weight.detach().numpy().T.copy()
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 7, 32]))
    w = ir.Value(name="Attention_0_qkv_weight", const_value=ir.tensor(packed, name="Attention_0_qkv_weight"))
    b = ir.Value(name="Attention_0_qkv_bias", const_value=ir.tensor(bias, name="Attention_0_qkv_bias"))
    d = ir.Value(name="onnx::MatMul_99", const_value=ir.tensor(dense, name="onnx::MatMul_99"))
    attn = ir.node("Attention", [x, w, b], domain="com.microsoft", attributes={"num_heads": 4}, name="Attention_0")
    out = ir.node("MatMul", [attn.outputs[0], d], name="/encoder/layer.0/attention/output/dense/MatMul")
    graph = ir.Graph(
        [x], out.outputs, nodes=[attn, out], initializers=[w, b, d], opset_imports={"": 17, "com.microsoft": 1}
    )
    ir.save(ir.Model(graph, ir_version=9), path)


def _ort_quantized(plain, out):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(plain), str(out), weight_type=QuantType.QInt8)
    return out


@pytest.mark.parametrize("graph", ["fused-attention", "ort-quantizer"])
@pytest.mark.parametrize("with_weights", [False, True], ids=["names", "base-weights"])
def test_fused_or_quantized_projections_are_refused(bert, tmp_path, graph, with_weights):
    """Q/K/V packed into one Attention weight, or int8 weights: query/value used to be skipped as absent
    while dense merged (exit 0, error 7.7e-2 against an effect of 0.2). Now refused, except the Attention
    slices with base weights, which the attention plugin finds by value (exactness: test_plugin_attention)."""
    from lora_export_plugins import attention

    attention.register()  # the plugin that reads Attention's packed weight (entry point may not be installed)
    base, _, plain, weights, adapter, _ = bert
    model = tmp_path / "model.onnx"
    if graph == "fused-attention":
        _fused_attention(base, model)
    else:
        _ort_quantized(plain, model)
        assert {n.op_type for n in ir.load(model).graph} & {"MatMulInteger", "DynamicQuantizeMatMul"}
    extra = ["--base-weights", weights] if with_weights else []
    code, out, err = _merge(model, adapter, "-o", tmp_path / "merged.onnx", *extra, "--json")
    if graph == "fused-attention" and with_weights:
        # The Attention plugin places query and value in their slices of the packed weight, by value.
        assert code == 0, err
        status = {r["target"]: (r["status"], r["strategy"]) for r in json.loads(out)["targets"]}
        for p in ("query", "value"):
            assert status[f"encoder.layer.0.attention.self.{p}"] == ("matched", "packed")
        packed = ir.load(tmp_path / "merged.onnx").graph.initializers["Attention_0_qkv_weight"].const_value.numpy()
        before = ir.load(model).graph.initializers["Attention_0_qkv_weight"].const_value.numpy()
        np.testing.assert_array_equal(packed[:, 32:64], before[:, 32:64])  # key: not adapted
        assert not np.array_equal(packed[:, :32], before[:, :32])
        return
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    if graph == "fused-attention":
        assert ("query" in err or "value" in err) and "packed" in err
    elif not with_weights:
        # The int8 plugin reads the quantized projections; the pooler, missing from the graph, cannot be
        # proven absent without the base weights: still refused, never skipped.
        assert "pooler.dense" in err and "quantized" in err
    else:
        # With them every int8 tensor holds another base weight within its rounding: the pooler is proven
        # absent; the merge itself still asks to accept requantization (test_quantized_absence: exactness).
        assert "--requantize" in err and "pooler" not in err
        code, out, err = _merge(model, adapter, "-o", tmp_path / "merged.onnx", *extra, "--json", "--requantize")
        assert code == 0, err
        status = {r["target"]: r["status"] for r in json.loads(out)["targets"]}
        assert status["pooler.dense"] == "absent" and list(status.values()).count("matched") == len(status) - 1
        return
    assert not (tmp_path / "merged.onnx").exists()


def test_ort_transformer_optimizer_graph_is_exact(bert, tmp_path):
    """ONNX Runtime's optimizer output (SkipLayerNormalization, Gelu, MatMul+Add → Gemm): exact or refused."""
    from onnxruntime.transformers import optimizer

    _, make_inputs, plain, weights, adapter, peft_model = bert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimizer.optimize_model(str(plain), model_type="bert", num_heads=4, hidden_size=32)
    opt.save_model_to_file(str(tmp_path / "opt.onnx"))
    inputs = make_inputs(9)
    ref = output_of(peft_model, inputs)
    # "dense" also names the pooler, which is not in the graph: refused until base weights prove it.
    code, _, err = _merge(tmp_path / "opt.onnx", adapter, "-o", tmp_path / "merged.onnx")
    assert code == 2 and "pooler.dense" in err and "--base-weights" in err
    code, _, err = _merge(tmp_path / "opt.onnx", adapter, "-o", tmp_path / "merged.onnx", "--base-weights", weights)
    assert code == 0, err
    got = run_plain(tmp_path / "merged.onnx", feeds_of(inputs))[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-5 * np.abs(ref.numpy()).max()


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attn()

    def forward(self, x):
        return self.self_attn(x)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer()])

    def forward(self, x):
        return self.layers[0](x)


class _Top(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Model()

    def forward(self, x):
        return self.model(x)


def _genai_style(top: _Top, path) -> None:
    """The onnxruntime-genai builder's layout: q/k/v packed into one ``attn/qkv_proj`` MatMul, ``attn``
    where the model says ``self_attn``."""
    packed_attention(top.model.layers[0].self_attn, path, prefix="/model/layers.0/attn")


@pytest.mark.parametrize("with_weights", [False, True], ids=["names", "base-weights"])
def test_packed_and_renamed_projections_are_refused(tmp_path, with_weights):
    """By names alone a packed q/k/v is refused in one line; with base weights each target's slice is found
    by value and the merge is exact (see ``test_packed``)."""
    torch.manual_seed(0)
    top = _Top().eval()
    _genai_style(top, tmp_path / "model.onnx")
    x = torch.randn(2, 8)
    np.testing.assert_allclose(run_plain(tmp_path / "model.onnx", {"x": x.numpy()})[0], top(x).detach(), rtol=1e-5)
    adapter = tmp_path / "adapter"
    peft_model = saved_peft_reference(top, adapter, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"])
    extra = []
    if with_weights:
        save_file({k: v.detach().numpy().copy() for k, v in top.state_dict().items()}, str(tmp_path / "w.st"))
        extra = ["--base-weights", tmp_path / "w.st"]
    code, out, err = _merge(tmp_path / "model.onnx", adapter, "-o", tmp_path / "merged.onnx", *extra)
    if with_weights:
        assert code == 0, err
        x = torch.randn(2, 8)
        ref = peft_model(x).detach().numpy()
        got = run_plain(tmp_path / "merged.onnx", {"x": x.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
        return
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "q_proj" in err and "packed" in err and "--base-weights" in err
    assert not (tmp_path / "merged.onnx").exists()


def test_exporter_manifest_proves_absence(tmp_path):
    """Our exporter sees the torch model: a module whose weight is provably not in the graph is recorded,
    so merge can skip it without base weights."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.pooler = nn.Linear(8, 8)  # never called

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 8)
    path = export(net, (x,), tmp_path / "net.onnx", dynamo=False)
    manifest = json.loads(ir.load(path).metadata_props["lora_export.manifest"])
    assert manifest["absent"] == ["pooler"]
    peft_model = saved_peft_reference(net, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["lin", "pooler"])
    report = merge_file(path, tmp_path / "adapter", tmp_path / "merged.onnx")
    assert [r.target.name for r in report.resolution.absent] == ["pooler"]
    import onnxruntime as ort

    name = ort.InferenceSession(str(tmp_path / "merged.onnx")).get_inputs()[0].name
    got = run_plain(tmp_path / "merged.onnx", {name: x.numpy()})[0]
    np.testing.assert_allclose(got, output_of(peft_model, {"x": x}), rtol=1e-5, atol=1e-6)


def test_allow_partial_reports_what_it_skipped(bert, tmp_path):
    """--allow-partial is the user's explicit choice; the report still names every skipped target."""
    base, _, _, _, adapter, _ = bert
    _fused_attention(base, tmp_path / "fused.onnx")
    with pytest.raises(TargetError):
        merge_file(tmp_path / "fused.onnx", adapter, tmp_path / "m.onnx")
    report = merge_file(tmp_path / "fused.onnx", adapter, tmp_path / "m.onnx", allow_partial=True)
    skipped = {r.target.name for r in report.resolution.unmatched}
    assert "encoder.layer.0.attention.self.query" in skipped and len(report.merged) == 1

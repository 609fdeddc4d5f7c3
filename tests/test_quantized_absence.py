"""Proving a target absent from a graph quantized by onnxruntime's own ``quantize_dynamic`` (MatMulInteger weights,
Gather → DequantizeLinear embeddings): integer tensors count as accounted for only when they hold *another* base
weight within their rounding; one holding the target's own weight keeps it present (refused), never absent.

Reference for inject on a dynamically quantized graph (activations are quantized at run time, so the untouched file
is itself off the float model): the adapter's effect, injected(adapter) − untouched file, against PEFT's effect,
PEFT(adapter) − PyTorch base, both on the base whose weights are the file's dequantized ones.
"""

from __future__ import annotations

import copy
import json
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
from models import tiny_bert
from onnx import numpy_helper
from onnxruntime.quantization import quantize_dynamic
from safetensors.torch import save_file

from lora_export.cli import cli
from lora_export.formats.adapter_files import read_adapter_tensors


@pytest.fixture(autouse=True, scope="module")
def _registered():
    from lora_export_plugins import int8

    int8.register()
    yield


def _run(path: Path, feeds: dict, extra: dict | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {**feeds, **(extra or {})})[0]


def _save_base(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return path


def _dequantized(model: torch.nn.Module, qpath: Path) -> torch.nn.Module:
    """``model`` with the weights the quantized file holds (MatMulInteger weights and Gather tables, dequantized)."""
    g = onnx.load(str(qpath)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    sd = model.state_dict()

    def deq(stem: str) -> np.ndarray:
        q, sc, zp = (inits[stem + s].astype(np.float32) for s in ("_quantized", "_scale", "_zero_point"))
        return ((q - zp) * sc).astype(np.float32)

    for n in g.node:
        if n.op_type == "MatMulInteger":
            module = re.match(r"/model/(.*)/MatMul_quant", n.name).group(1).replace("/", ".")
            sd[module + ".weight"] = torch.from_numpy(deq(n.input[1][: -len("_quantized")]).T.copy())
    for key in [k for k in sd if k.startswith("embeddings.") and k.endswith("embeddings.weight")]:
        if "model." + key + "_quantized" in inits:
            sd[key] = torch.from_numpy(deq("model." + key))
    out = copy.deepcopy(model)
    out.load_state_dict(sd)
    return out


@pytest.fixture(scope="module")
def bert_int8(tmp_path_factory):
    """tiny BERT exported with last_hidden_state only (the pooler is not in the graph), dynamically quantized."""
    root = tmp_path_factory.mktemp("bert_int8")
    model, make_inputs = tiny_bert()
    export_base(model, make_inputs(0), root / "base.onnx")
    quantize_dynamic(str(root / "base.onnx"), str(root / "q.onnx"))
    ops = {n.op_type for n in onnx.load(str(root / "q.onnx")).graph.node}
    assert {"MatMulInteger", "DequantizeLinear"} <= ops, ops  # quantized projections and embedding tables
    return root, model, make_inputs, _save_base(model, root / "base.safetensors")


def _cli(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_pooler_proven_absent_and_inject_exact(bert_int8, tmp_path):
    root, model, make_inputs, base_weights = bert_int8
    qpath = root / "q.onnx"
    peft_model = peft_reference(model, seed=5, r=4, lora_alpha=8, target_modules=["query", "value", "pooler.dense"])
    peft_model.save_pretrained(str(tmp_path / "ad"))
    res = _cli("inject", qpath, tmp_path / "ad", "-o", tmp_path / "inj", "--base-weights", base_weights, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["absent"] == ["pooler.dense"], report["absent"]
    assert len(report["slots"]) == 4  # query and value of both layers

    feeds = feeds_of(make_inputs(7))
    untouched = _run(qpath, feeds)
    injected = tmp_path / "inj" / "model.onnx"
    assert np.array_equal(_run(injected, feeds), untouched)  # no adapter: the file as it was, bit for bit
    with_adapter = _run(injected, feeds, read_adapter_tensors(tmp_path / "inj" / "ad.safetensors"))
    deq = _dequantized(model, qpath)
    peft_deq = copy.deepcopy(peft_model)  # the same LoRA weights on the dequantized base
    own = peft_deq.base_model.model.state_dict()
    with torch.no_grad():
        for k, v in deq.state_dict().items():
            module, leaf = k.rsplit(".", 1)
            own[k if k in own else f"{module}.base_layer.{leaf}"].copy_(v)
    inputs = make_inputs(7)
    effect = (output_of(peft_deq, inputs) - output_of(deq, inputs)).numpy()
    assert np.abs(effect).max() > 1e-2
    # Only the base path's activations are quantized at run time; the branch is float: a small residue remains.
    err = rel_err(with_adapter - untouched, effect)
    print(f"inject effect vs PEFT effect on the dequantized base: {err:.2e} of {np.abs(effect).max():.3g}")
    assert err < 2e-2

    res = _cli(
        "merge", "--requantize", qpath, tmp_path / "ad", "-o", tmp_path / "m.onnx", "--base-weights", base_weights
    )
    assert res.exit_code == 0, res.output
    assert "1 absent" in res.output


def test_without_base_weights_absence_is_not_assumed(bert_int8, tmp_path):
    root, model, _, _ = bert_int8
    peft_reference(model, seed=5, r=2, lora_alpha=4, target_modules=["query", "pooler.dense"]).save_pretrained(
        str(tmp_path / "ad")
    )
    res = _cli("inject", root / "q.onnx", tmp_path / "ad", "-o", tmp_path / "inj")
    assert res.exit_code == 2 and "pooler.dense" in res.output, res.output
    assert not (tmp_path / "inj").exists()


def test_an_int8_tensor_holding_no_base_weight_keeps_the_proof_from_holding(bert_int8, tmp_path):
    # Base weights without layer 1's output.dense: its int8 weight is then unexplained, and could be the pooler.
    root, model, _, _ = bert_int8
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "layer.1.output.dense" not in k}
    save_file(state, str(tmp_path / "partial.safetensors"))
    peft_reference(model, seed=5, r=2, lora_alpha=4, target_modules=["query", "pooler.dense"]).save_pretrained(
        str(tmp_path / "ad")
    )
    res = _cli(
        "inject",
        root / "q.onnx",
        tmp_path / "ad",
        "-o",
        tmp_path / "inj",
        "--base-weights",
        tmp_path / "partial.safetensors",
    )
    assert res.exit_code == 2 and "pooler.dense" in res.output and "match no base weight" in res.output, res.output
    assert not (tmp_path / "inj").exists()


def test_quantized_embedding_holding_the_targets_own_weight_is_not_absent(bert_int8, tmp_path):
    # word_embeddings is in the graph, quantized (Gather of an int8 table → DequantizeLinear): no layout reads it
    # for LoRA, but its integers hold the target's own weight, so it must never be proven absent.
    root, model, _, base_weights = bert_int8
    peft_reference(model, seed=5, r=2, lora_alpha=4, target_modules=["query", "word_embeddings"]).save_pretrained(
        str(tmp_path / "ad")
    )
    for cmd in (["inject"], ["merge", "--requantize"]):
        out = tmp_path / cmd[0]
        res = _cli(*cmd, root / "q.onnx", tmp_path / "ad", "-o", out, "--base-weights", base_weights)
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert len(line.splitlines()) == 1 and "word_embeddings" in line and "quantized" in line, line
        print(line)
        assert not out.exists()


class _TwoPoolers(torch.nn.Module):
    """A BERT whose pooler is applied twice, by the module and by a copy: two int8 tensors hold its weight."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.copy = copy.deepcopy(bert.pooler.dense)
        with torch.no_grad():
            # ORT's quantizer leaves a MatMul whose weight equals an already quantized one in float: 1e-8 off in
            # one entry (far within the rounding) and it quantizes the copy on its own.
            self.copy.weight[0, 0] += 1e-8

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        # Different rows for the copy: ORT's quantizer leaves a second MatMul on the same input in float.
        return h + torch.tanh(self.bert.pooler.dense(h[:, :1])) + torch.tanh(self.copy(h[:, 1:2]))


def test_int8_weights_holding_the_targets_own_weight_are_not_absent(tmp_path):
    model, make_inputs = tiny_bert()
    export_base(_TwoPoolers(model), make_inputs(0), tmp_path / "base.onnx")
    quantize_dynamic(str(tmp_path / "base.onnx"), str(tmp_path / "q.onnx"))
    q = onnx.load(str(tmp_path / "q.onnx"))
    readers = [
        n
        for n in q.graph.node
        if n.op_type == "MatMulInteger" and re.fullmatch("/model/(dense|copy)/MatMul_quant", n.name)
    ]
    assert len(readers) == 2 and readers[0].input[1] != readers[1].input[1], [n.name for n in readers]
    for i, n in enumerate(q.graph.node):  # scrambled names: nothing resolves by name
        n.name = f"n{i}"
    onnx.save(q, str(tmp_path / "scrambled.onnx"))
    base_weights = _save_base(model, tmp_path / "base.safetensors")
    peft_reference(model, seed=5, r=2, lora_alpha=4, target_modules=["pooler.dense"]).save_pretrained(
        str(tmp_path / "ad")
    )
    for cmd in (["inject"], ["merge", "--requantize"]):
        out = tmp_path / cmd[0]
        res = _cli(*cmd, tmp_path / "scrambled.onnx", tmp_path / "ad", "-o", out, "--base-weights", base_weights)
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert len(line.splitlines()) == 1 and "pooler.dense" in line and "quantized" in line, line
        print(line)
        assert not out.exists()


@pytest.mark.parametrize(
    ("shape", "scale_shape", "axis", "block"),
    [((6, 8), (), 1, 0), ((6, 8), (8,), 1, 0), ((6, 8), (6,), 0, 0), ((6, 8), (6, 3), 1, 3), ((6, 8), (2, 8), 0, 4)],
)
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_dequantize_linear_is_onnx_dequantize_linear(shape, scale_shape, axis, block, dtype):
    from lora_export_plugins.int8_weights import dequantize_linear
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max + 1, size=shape).astype(dtype)
    scale = rng.uniform(0.01, 0.1, size=scale_shape).astype(np.float32)
    zp = rng.integers(info.min, info.max + 1, size=scale_shape).astype(dtype)
    attrs = {"axis": axis, **({"block_size": block} if block else {})}
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)
    elem = TensorProto.INT8 if dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(
        [node],
        "dq",
        [helper.make_tensor_value_info(n, t, None) for n, t in (("q", elem), ("s", TensorProto.FLOAT), ("z", elem))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    expected = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])).run(
        None, {"q": q, "s": scale, "z": zp}
    )[0]
    y, bound = dequantize_linear(q, scale, zp, axis, block, np.dtype(np.float32))
    assert np.array_equal(y, expected)
    assert bound.shape == y.shape and np.all(bound > 0)

"""Target resolution: each strategy, absent vs unmatched, ambiguity, kind and shape checks."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx_fixtures import export_onnx
from torch import nn

from lora_export import Adapter, LoraConfig, LoraTarget, merge_adapter
from lora_export.errors import ShapeError, TargetError
from lora_export.graph.match.module_paths import scope_module_paths, strip_wrappers, suffix_score
from lora_export.graph.targets.resolve import MANIFEST_KEY, resolve_targets


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.a = nn.Sequential(nn.Linear(8, 6))
        self.b = nn.Sequential(nn.Linear(6, 8))
        self.pooler = nn.Linear(8, 8)  # never called: absent from any export

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.b(self.a(x))


class Top(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Block()

    def forward(self, ids):
        return self.model(ids)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    top = Top().eval()
    root = tmp_path_factory.mktemp("resolve")
    ids = {"ids": torch.randint(0, 10, (2, 3))}
    paths = {d: export_onnx(top, ids, root / f"m{int(d)}.onnx", dynamo=d) for d in (False, True)}
    weights = {k: v.detach().numpy().copy() for k, v in top.state_dict().items()}
    return paths, weights


def _target(name: str, kind: str = "linear", out: int = 8, inp: int = 8) -> LoraTarget:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, inp)).astype(np.float32)
    b = rng.standard_normal((out, 2)).astype(np.float32)
    return LoraTarget(name, kind, a, b, 0.5)


def _adapter(*targets: LoraTarget) -> Adapter:
    return Adapter({t.name: t for t in targets}, LoraConfig(r=2))


def _by_name(res):
    return {r.target.name: r for r in res.targets}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_strategies(models, dynamo):
    paths, weights = models
    model = ir.load(paths[dynamo])
    adapter = _adapter(
        _target("model.layers.0"),
        _target("layers.1"),  # adapter without the outer prefix
        _target("base_model.model.model.a.0", out=6),  # PEFT-style prefix
        _target("model.emb", "embedding", out=8, inp=10),
        _target("model.pooler"),
    )
    res = _by_name(resolve_targets(model, adapter))
    linear_strategy = "scope" if dynamo else "node-name"
    assert res["model.layers.0"].strategy == linear_strategy
    assert res["layers.1"].status == "matched"
    assert res["layers.1"].value is not res["model.layers.0"].value
    assert res["base_model.model.model.a.0"].status == "matched"
    assert res["model.emb"].strategy == "initializer-name"
    assert res["model.emb"].node.op_type == "Gather"
    # Never called, so not in the graph; names cannot prove that, values can.
    assert res["model.pooler"].status == "unmatched" and "--base-weights" in res["model.pooler"].detail
    with_values = _by_name(resolve_targets(model, adapter, base_weights=weights))
    assert with_values["model.pooler"].status == "absent"
    assert all(r.status == "matched" for k, r in with_values.items() if k != "model.pooler")
    report = resolve_targets(model, adapter).to_report()
    assert json.loads(json.dumps(report))[0]["initializer"] == res["model.layers.0"].value.name


def test_manifest_wins(models):
    paths, _ = models
    model = ir.load(paths[True])
    # Point layers.0 at layers.1's weight: the manifest is trusted first.
    other = _by_name(resolve_targets(model, _adapter(_target("model.layers.1")))).get("model.layers.1")
    manifest = {"version": 1, "modules": {"model.layers.0": {"initializer": other.value.name, "node": other.node.name}}}
    model.metadata_props[MANIFEST_KEY] = json.dumps(manifest)
    r = resolve_targets(model, _adapter(_target("model.layers.0"))).targets[0]
    assert (r.strategy, r.value.name) == ("manifest", other.value.name)


def _anonymize(model: ir.Model) -> None:
    for i, node in enumerate(model.graph):
        node.name = f"n{i}"
        node.metadata_props.clear()
    for i, name in enumerate(list(model.graph.initializers)):
        model.graph.initializers[name].name = f"w{i}"


def test_fingerprint(models):
    paths, weights = models
    model = ir.load(paths[False])
    _anonymize(model)
    adapter = _adapter(_target("model.layers.0"), _target("model.emb", "embedding", out=8, inp=10))
    res = resolve_targets(model, adapter)
    # No names at all: nothing can be proven absent.
    assert [r.status for r in res.targets] == ["unmatched", "unmatched"]
    assert "--base-weights" in res.targets[0].detail
    res = resolve_targets(model, adapter, base_weights=weights)
    assert [r.strategy for r in res.targets] == ["fingerprint", "fingerprint"]
    assert res.targets[0].node.op_type == "MatMul"


def test_ambiguous_and_kind(models):
    paths, _ = models
    model = ir.load(paths[False])
    # "0" names both a.0 and b.0 (and layers.0): ambiguous, so not matched by a guess.
    res = _by_name(resolve_targets(model, _adapter(_target("0"), _target("model.layers.0", "embedding"))))
    assert res["0"].status == "unmatched" and "ambiguous" in res["0"].detail
    # An embedding target never lands on a MatMul weight.
    assert res["model.layers.0"].status != "matched"


def test_shape_mismatch_and_foreign_adapter(models):
    paths, _ = models
    model = ir.load(paths[False])
    with pytest.raises(ShapeError, match=r"model\.layers\.0.*\(8, 4\).*\(8, 8\)"):
        merge_adapter(model, _adapter(_target("model.layers.0", inp=4)))
    with pytest.raises(TargetError, match="another model"):
        merge_adapter(model, _adapter(_target("encoder.layer.0.attention.self.query")))
    with pytest.raises(TargetError, match="allow-partial"):
        merge_adapter(model, _adapter(_target("model.layers.0"), _target("0")))
    report = merge_adapter(ir.load(paths[False]), _adapter(_target("model.layers.0"), _target("0")), allow_partial=True)
    assert len(report.merged) == 1 and len(report.resolution.unmatched) == 1


def test_tied_weight_gets_private_copy():
    """One initializer read by Gather (emb) and Gemm (head, tied): a LoRA on emb must not change head.

    The embedding gets its own merged copy; the head keeps the original tensor."""
    w = np.arange(80, dtype=np.float32).reshape(10, 8) / 80
    weight = ir.Value(name="emb.weight", const_value=ir.tensor(w, name="emb.weight"))
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([3]))
    gather = ir.node("Gather", [weight, ids], name="/emb/Gather")
    gemm = ir.node("Gemm", [gather.outputs[0], weight], attributes={"transB": 1}, name="/head/Gemm")
    graph = ir.Graph([ids], gemm.outputs, nodes=[gather, gemm], initializers=[weight], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    t = _target("emb", "embedding", out=8, inp=10)
    report = merge_adapter(model, _adapter(t))
    r = report.resolution.targets[0]
    assert r.nodes == [gather] and r.shared_with == ["Gemm '/head/Gemm'"]
    assert report.merged[0]["private_copy_of"] == "emb.weight"
    np.testing.assert_array_equal(weight.const_value.numpy(), w)
    assert gemm.inputs[1] is weight and gather.inputs[0] is not weight
    np.testing.assert_allclose(gather.inputs[0].const_value.numpy(), w + t.delta(), rtol=1e-6)
    assert len(graph) == 2  # no node added


def test_tied_lm_head_via_transpose_gets_private_copy():
    """lm_head reads the tied table through Transpose: LoRA on lm_head leaves the embedding alone."""
    w = np.arange(80, dtype=np.float32).reshape(10, 8) / 80
    weight = ir.Value(name="wte", const_value=ir.tensor(w, name="wte"))
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([3]))
    gather = ir.node("Gather", [weight, ids], name="/transformer/wte/Gather")
    tr = ir.node("Transpose", [weight], attributes={"perm": [1, 0]}, name="/lm_head/Transpose")
    mm = ir.node("MatMul", [gather.outputs[0], tr.outputs[0]], name="/lm_head/MatMul")
    graph = ir.Graph([ids], mm.outputs, nodes=[gather, tr, mm], initializers=[weight], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    t = _target("lm_head", out=10, inp=8)
    report = merge_adapter(model, _adapter(t))
    assert report.resolution.targets[0].strategy == "node-name"
    np.testing.assert_array_equal(weight.const_value.numpy(), w)
    assert gather.inputs[0] is weight and tr.inputs[0] is not weight
    np.testing.assert_allclose(tr.inputs[0].const_value.numpy(), w + t.delta(), rtol=1e-6)


def test_shared_weight_unnamed_and_named_is_refused():
    """A weight read by a node of another module and by an unnamed node: which is the target? Refused."""
    w = np.ones((8, 8), dtype=np.float32)
    weight = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    a = ir.node("MatMul", [x, weight], name="/other/MatMul")
    b = ir.node("MatMul", [a.outputs[0], weight], name="n1")
    graph = ir.Graph([x], b.outputs, nodes=[a, b], initializers=[weight], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    weights = {"lin.weight": w, "other.weight": w}
    res = resolve_targets(model, _adapter(_target("lin")), base_weights=weights)
    assert res.targets[0].status == "unmatched" and "cannot tell" in res.targets[0].detail


def test_module_path_helpers():
    assert strip_wrappers("base_model.model._orig_mod.layers.0") == "layers.0"
    assert suffix_score("model.layers.0.q_proj", "layers.0.q_proj") == 3
    assert suffix_score("layers.0.q_proj", "layers.1.q_proj") == 0
    node = ir.node("MatMul", [], name="x")
    node.metadata_props["namespace"] = ": __main__.M/lin: torch.nn.modules.linear.Linear/linear: aten.linear.default"
    assert scope_module_paths(node) == ["lin"]
    node.metadata_props["namespace"] = ": M/model: A/layers.0: B/self_attn: C/q_proj: Linear/linear: aten.linear"
    assert scope_module_paths(node) == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("case", ["nested-manifest", "ill-typed-manifest", "string-transB"], ids=lambda c: c)
def test_in_memory_models_are_checked_too(case):
    """merge_adapter/resolve_targets on an ir.Model built in memory (no load_model): one-line errors or a
    sound resolution, never a RecursionError/TypeError from inside."""
    from lora_export.errors import LoraExportError

    w = np.ones((8, 8), dtype=np.float32)
    weight = ir.Value(name="lin.weight", const_value=ir.tensor(w, name="lin.weight"))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    attrs = {"transB": "yes"} if case == "string-transB" else {"transB": 1}
    gemm = ir.node("Gemm", [x, weight], attributes=attrs, name="/lin/Gemm")
    graph = ir.Graph([x], gemm.outputs, nodes=[gemm], initializers=[weight], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    if case == "nested-manifest":
        model.metadata_props[MANIFEST_KEY] = "[" * 100000 + "]" * 100000
    elif case == "ill-typed-manifest":
        model.metadata_props[MANIFEST_KEY] = json.dumps({"modules": {"lin": 5, "x": {"initializer": [1]}}})
    try:
        res = resolve_targets(model, _adapter(_target("lin")))
    except LoraExportError as e:
        assert "\n" not in str(e)
    else:
        assert res.targets[0].status == "matched"

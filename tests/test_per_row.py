"""``inject --per-row``: every row of one batch runs its own adapter from the pool (or none), in stock ONNX
Runtime ops. Reference: PEFT with that row's adapter alone; rows without adapter: the base ONNX model.

Covered: our tiny LLaMA exported with its KV cache (prefill and decode steps), the same wrapped in Optimum's
``If`` (decoder_model_merged), packed q/k/v (+gate/up) in fp32 and int4 (the genai builder's layout), plain
ONNX Runtime fed pool.safetensors, adapters of different ranks, targets, rsLoRA and DoRA in one pool, and
the one-line refusals."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import peft_reference
from foreign_graphs import wrap_in_if
from models import tiny_llama
from per_row_fixtures import (
    cli_run,
    cpu_session,
    export_with_past,
    feeds,
    rel,
    saved_peft_adapters,
    step_inputs,
    torch_step,
)
from safetensors.numpy import load_file
from torch import nn

from lora_export.graph.slots.per_row import IDS_INPUT, POOL_ORDER_KEY

ADAPTERS = {  # different ranks, target sets, rsLoRA and DoRA in one pool
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "vdown": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], use_rslora=True),
    "qo": dict(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"]),
    "dora": dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"], use_dora=True),
}
ROWS = ["qv", None, "vdown", "qo", "dora", "qv"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("per-row")
    base, _ = tiny_llama()
    export_with_past(base, root / "base.onnx")
    peft = saved_peft_adapters(root, base, ADAPTERS, seed=40)
    return {"root": root, "base": base, "peft": peft}


def _inject(case, out, base=None, names=tuple(ADAPTERS), extra=()) -> tuple[int, str]:
    root = case["root"]
    args = ["inject", base or root / "base.onnx", *(f"{n}={root / n}" for n in names), "-o", out, "--per-row"]
    code, _, err = cli_run(*args, *extra)
    return code, err


def _pool_feeds(folder) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """pool.safetensors as plain ONNX Runtime users read it: tensors, and adapter name → id."""
    from safetensors import safe_open

    with safe_open(str(folder / "pool.safetensors"), "np") as f:
        order = json.loads(f.metadata()[POOL_ORDER_KEY])
    return load_file(str(folder / "pool.safetensors")), {n: i + 1 for i, n in enumerate(order)}


def _check_rows(case, got: list[np.ndarray], inputs, rows, base_out: list[np.ndarray]) -> None:
    for i, row in enumerate(rows):
        if row is None:
            for g, b in zip(got, base_out):
                np.testing.assert_allclose(g[i], b[i], rtol=0, atol=1e-6)
            continue
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        ref = torch_step(case["peft"][row], one)
        assert rel(got[0][i], ref[0][0]) <= 1e-5, (i, row)
        assert rel(got[0][i], base_out[0][i]) > 1e-3, (i, row)  # the adapter changes the row: not vacuous
        for g, r in zip(got[1:], ref[1:]):
            assert rel(g[i], r[0]) <= 1e-5, (i, row)


@pytest.mark.parametrize("step", [(0, 5), (4, 1)], ids=["prefill", "decode"])
def test_every_row_runs_its_own_adapter_in_plain_onnxruntime(case, tmp_path, step):
    code, err = _inject(case, tmp_path / "out")
    assert code == 0, err
    pool, ids_of = _pool_feeds(tmp_path / "out")
    inputs = step_inputs(len(ROWS), *step, seed=11)
    sess = cpu_session(tmp_path / "out" / "model.onnx")
    ids = np.array([ids_of[r] if r else 0 for r in ROWS], dtype=np.int64)
    got = sess.run(None, {**feeds(inputs), **pool, IDS_INPUT: ids})
    base_out = cpu_session(case["root"] / "base.onnx").run(None, feeds(inputs))
    _check_rows(case, got, inputs, ROWS, base_out)
    # The defaults (no pool fed, ids [0]) are the base model; ids of shape (1,) apply one adapter to all rows.
    for g, b in zip(sess.run(None, feeds(inputs)), base_out):
        np.testing.assert_allclose(g, b, rtol=0, atol=1e-6)
    one = sess.run(None, {**feeds(inputs), **pool, IDS_INPUT: np.array([ids_of["qo"]], dtype=np.int64)})
    _check_rows(case, one, inputs, ["qo"] * len(ROWS), base_out)


def test_optimum_merged_decoder_with_past(case, tmp_path):
    """Optimum's decoder_model_merged: the branches live in both If subgraphs; the pool and ids in the top graph."""
    merged = wrap_in_if(case["root"] / "base.onnx", tmp_path / "decoder_model_merged.onnx")
    code, err = _inject(case, tmp_path / "out", base=merged, names=["qv", "vdown", "dora"])
    assert code == 0, err
    pool, ids_of = _pool_feeds(tmp_path / "out")
    rows = ["dora", "qv", None, "vdown"]
    ids = np.array([ids_of[r] if r else 0 for r in rows], dtype=np.int64)
    sess = cpu_session(tmp_path / "out" / "model.onnx")
    for step, flag in (((0, 4), False), ((3, 1), True)):
        inputs = step_inputs(len(rows), *step, seed=12)
        f = {**feeds(inputs), "use_cache_branch": np.array(flag)}
        got = sess.run(None, {**f, **pool, IDS_INPUT: ids})
        base_out = cpu_session(merged).run(None, f)
        _check_rows(case, got, inputs, rows, base_out)


@pytest.fixture(scope="module")
def packed(case):
    """The genai builder's layout: q/k/v and gate/up packed into one MatMul each, fp32 and int4, with
    adapters trained on the int4 model's dequantized weights (QLoRA)."""
    from lora_export_plugins import int4
    from quant_fixtures import dequantized_torch, pack, quantize, state_dict_of
    from safetensors.numpy import save_file

    int4.register()
    root = case["root"] / "packed"
    root.mkdir()
    pack(case["root"] / "base.onnx", root / "fp32.onnx", gate_up=True)
    quantize(root / "fp32.onnx", root / "int4.onnx")
    deq = dequantized_torch(case["base"], root / "int4.onnx")
    save_file(state_dict_of(case["base"]), str(root / "base.safetensors"))
    refs = {"fp32": {}, "int4": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (name, config) in enumerate(
            {
                "qkv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
                "v": ADAPTERS["vdown"],
            }.items()
        ):
            for kind, model in (("fp32", case["base"]), ("int4", deq)):
                refs[kind][name] = peft_reference(model, seed=60 + i, **config)
                refs[kind][name].save_pretrained(str(root / kind / name))
    return root, refs, deq


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_packed_and_int4_projections(case, packed, tmp_path, kind):
    root, refs, deq = packed
    args = ["inject", root / f"{kind}.onnx", *(f"{n}={root / kind / n}" for n in ("qkv", "v")), "-o", tmp_path / "o"]
    code, _, err = cli_run(*args, "--per-row", "--base-weights", root / "base.safetensors")
    assert code == 0, err
    pool, ids_of = _pool_feeds(tmp_path / "o")
    rows = ["v", None, "qkv"]
    inputs = step_inputs(len(rows), 2, 3, seed=13)
    ids = np.array([ids_of[r] if r else 0 for r in rows], dtype=np.int64)
    got = cpu_session(tmp_path / "o" / "model.onnx").run(None, {**feeds(inputs), **pool, IDS_INPUT: ids})
    base_out = cpu_session(root / f"{kind}.onnx").run(None, feeds(inputs))
    _check_rows({"peft": refs[kind]}, got, inputs, rows, base_out)


class _QKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


def test_two_dimensional_activations_refused(tmp_path):
    """(tokens, features) activations have no batch axis to pick adapters by: refused, nothing written."""
    from foreign_graphs import packed_attention
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    m = _QKV().eval()
    packed_attention(m, tmp_path / "model.onnx")
    save_file({k: v.detach().numpy().copy() for k, v in m.state_dict().items()}, str(tmp_path / "w.st"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_reference(m, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]).save_pretrained(str(tmp_path / "a"))
    args = [
        "inject",
        tmp_path / "model.onnx",
        tmp_path / "a",
        "-o",
        tmp_path / "o",
        "--base-weights",
        tmp_path / "w.st",
    ]
    code, _, err = cli_run(*args)
    assert code == 0, err  # without --per-row it injects
    code, _, err = cli_run(*args[:4], tmp_path / "o2", *args[5:], "--per-row")
    assert code == 2 and "batch-first" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()


def test_conv_slots_refused(tmp_path):
    from robust_fixtures import conv_model, write_conv_adapter

    (tmp_path / "conv.onnx").write_bytes(conv_model().SerializeToString())
    adapter = write_conv_adapter(tmp_path / "a")
    code, _, err = cli_run("inject", tmp_path / "conv.onnx", adapter, "-o", tmp_path / "o", "--per-row")
    assert code == 2 and "per-row" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", ["computed (batch, seq, -1)", "constant (-1, features)"])
def test_activation_ranks_past_contrib_ops(shape):
    """Past a contrib op ONNX inference knows nothing of (FusedMatMul), a Reshape's rank is the length of its
    shape tensor: 3 for TorchScript's Concat(batch, seq, -1), 2 for a constant (tokens, features) — which
    per-row slots must refuse."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from lora_export.graph.slots.activation_ranks import ActivationRanks

    const = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)  # noqa: E731
    nodes = [helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft")]
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.5] * 16), const("minus1", [-1])]
    if shape.startswith("computed"):
        nodes += [
            helper.make_node("Shape", ["y"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
            helper.make_node("Gather", ["s", "one"], ["t"], axis=0),
            helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
            helper.make_node("Unsqueeze", ["t", "axes"], ["t1"]),
            helper.make_node("Concat", ["b1", "t1", "minus1"], ["shape"], axis=0),
        ]
        scalar = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [], [v])  # noqa: E731
        inits += [scalar("zero", 0), scalar("one", 1), const("axes", [0])]
    else:
        inits += [const("shape", [-1, 4])]
    nodes += [helper.make_node("Reshape", ["y", "shape"], ["z"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [z], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    ir_model = ir.serde.deserialize_model(model)
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    assert not {"y", "z"} & {v.name for v in inferred if v.type.tensor_type.HasField("shape")}  # unknown to ONNX
    values = {v.name: v for n in ir_model.graph for v in n.outputs}
    ranks = ActivationRanks(ir_model)
    assert ranks.rank(values["y"]) == 3
    assert ranks.rank(values["z"]) == (3 if shape.startswith("computed") else 2)

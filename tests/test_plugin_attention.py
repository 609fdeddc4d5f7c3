"""ONNX Runtime's fused attention (plugin ``lora_export_plugins.attention``) on a tiny BERT run through the real
``onnxruntime.transformers.optimizer``: q/k/v slices of the packed ``Attention`` weight resolve by value
(``--base-weights``), merge into their slices (trained biases into the packed bias), and inject as an
effective weight computed before the op; ``MultiHeadAttention`` keeps its q/k/v MatMuls, which resolve by
name. PEFT's unmerged model is the reference, on fresh inputs with padding."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, peft_reference
from foreign_graphs import packed_attention, run_injected, run_plain
from inject_fixtures import REF_SEED, export_base, feeds_of
from lora_export_plugins import attention
from models import tiny_bert
from safetensors.numpy import save_file

from lora_export.cli import cli
from lora_export.runtime.session import LoraSession

ADAPTERS = {
    # q, k, v of different ranks in one Attention op; dense (MatMuls beside SkipLayerNorm/BiasGelu) by name.
    "qkvd": dict(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], rank_pattern={"key": 2}),
    "v_r3": dict(r=3, lora_alpha=3, target_modules=["value"]),
    # Trained biases: q/v into the Attention's packed bias, dense into SkipLayerNorm/BiasGelu by name.
    "qvd_bias": dict(r=2, lora_alpha=4, target_modules=["query", "value", "dense"], bias="lora_only"),
    "qv_dora": dict(r=2, lora_alpha=4, target_modules=["query", "value"], use_dora=True),
}


def _cli(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [*map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _optimize(src, dst, mha: bool) -> None:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_multi_head_attention = mha
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(
            str(src), model_type="bert", num_heads=4, hidden_size=32, opt_level=1, optimization_options=options
        )
    opt.save_model_to_file(str(dst))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    attention.register()  # the entry point may not be installed in this environment yet
    root = tmp_path_factory.mktemp("ort-attention")
    base, make_inputs = tiny_bert()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias"):  # BERT initializes biases to zero: equal tensors would be deduplicated
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    export_base(base, make_inputs(0), root / "plain.onnx")
    _optimize(root / "plain.onnx", root / "attn.onnx", mha=False)
    _optimize(root / "plain.onnx", root / "mha.onnx", mha=True)
    ops = {name: [n.op_type for n in ir.load(root / f"{name}.onnx").graph] for name in ("attn", "mha")}
    # The optimizer really fused attention (else every check below would pass vacuously).
    assert ops["attn"].count("Attention") == 2 and "MultiHeadAttention" not in ops["attn"]
    assert ops["mha"].count("MultiHeadAttention") == 2 and "Attention" not in ops["mha"]
    assert {"EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"} <= set(ops["attn"])
    weights = root / "base.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in base.state_dict().items()}, str(weights))
    fresh = make_inputs(REF_SEED)
    refs, paths = {}, {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        peft_model = peft_reference(base, seed=10 + i, **config)
        with torch.no_grad():
            for key, p in peft_model.named_parameters():
                if key.endswith(".bias") and p.requires_grad:  # trained biases that differ from the base
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        refs[name] = output_of(peft_model, fresh).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.save_pretrained(str(root / name))
        paths[name] = root / name
    feeds = feeds_of(fresh)
    outs = {name: run_plain(root / f"{name}.onnx", feeds)[0] for name in ("attn", "mha")}
    for out in outs.values():
        np.testing.assert_allclose(out, output_of(base, fresh).numpy(), rtol=1e-4, atol=1e-5)
    return dict(root=root, weights=weights, feeds=feeds, refs=refs, paths=paths, outs=outs)


def _attention_tensors(path) -> dict[str, np.ndarray]:
    model = ir.load(path)
    out = {}
    for node in model.graph:
        if node.op_type == "Attention":
            for v in node.inputs[1:3]:
                out[v.name] = v.const_value.numpy().copy()
    return out


@pytest.mark.parametrize("name", ["qkvd", "qvd_bias", "qv_dora"])
def test_merge_into_attention_slices_is_exact(case, tmp_path, name):
    model, out = case["root"] / "attn.onnx", tmp_path / "merged.onnx"
    code, stdout, err = _cli(
        "merge", model, case["paths"][name], "-o", out, "--base-weights", case["weights"], "--json"
    )
    assert code == 0, err
    assert _rel_err(run_plain(out, case["feeds"])[0], case["refs"][name]) <= 1e-5
    report = json.loads(stdout)
    strategies = {r["target"].rsplit(".", 1)[-1]: r["strategy"] for r in report["targets"] if r["status"] == "matched"}
    assert strategies["query"] == strategies["value"] == "packed"
    before, after = _attention_tensors(model), _attention_tensors(out)
    assert len(before) == 4
    for key, w in before.items():
        k = slice(32, 64) if w.ndim == 1 else (slice(None), slice(32, 64))
        q = slice(0, 32) if w.ndim == 1 else (slice(None), slice(0, 32))
        if w.ndim == 1 and name != "qvd_bias":
            np.testing.assert_array_equal(after[key], w)  # no trained bias: the packed bias is untouched
        elif name == "qkvd":
            assert not np.array_equal(after[key][k], w[k])
        else:
            # key is not adapted: its columns (and its bias) stay bit-identical; query's change.
            np.testing.assert_array_equal(after[key][k], w[k])
            assert not np.array_equal(after[key][q], w[q])


def test_inject_shares_one_attention_op_across_ranks(case, tmp_path):
    out_dir = tmp_path / "injected"
    code, _, err = _cli(
        "inject", case["root"] / "attn.onnx", case["paths"]["qkvd"], case["paths"]["v_r3"], "-o", out_dir,
        "--base-weights", case["weights"],
    )  # fmt: skip
    assert code == 0, err
    model = out_dir / "model.onnx"
    graph = ir.load(model).graph
    assert [n.op_type for n in graph].count("Attention") == 2
    # No adapter: A′·Pad(B′) of rank 0 is a zero matrix, so the op gets W bit for bit.
    np.testing.assert_array_equal(run_plain(model, case["feeds"])[0], case["outs"]["attn"])
    for name in ("qkvd", "v_r3"):
        got = run_injected(model, out_dir / f"{name}.onnx_adapter", case["feeds"])[0]
        assert _rel_err(got, case["refs"][name]) <= 1e-5, name
    # LoraSession with the branch-free twin: the effective-weight chains are stripped, the twin is the base.
    sess = LoraSession(model, providers=["CPUExecutionProvider"], base_session=True)
    sess.load_adapter("qkvd", case["paths"]["qkvd"])
    assert _rel_err(sess.run(None, case["feeds"], adapter="qkvd")[0], case["refs"]["qkvd"]) <= 1e-5
    np.testing.assert_array_equal(sess.run(None, case["feeds"])[0], case["outs"]["attn"])
    slots = json.loads(ir.load(model).metadata_props["lora_export.slots"])["slots"]
    q = next(s for s in slots if s["module"].endswith("layer.0.attention.self.query"))
    k = next(s for s in slots if s["module"].endswith("layer.0.attention.self.key"))
    assert q["node"] == k["node"] == "Attention_0" and q["weight_shape"] == [32, 32]


def test_names_alone_are_refused(case, tmp_path):
    for command, out in (("merge", tmp_path / "m.onnx"), ("inject", tmp_path / "inj")):
        code, _, err = _cli(command, case["root"] / "attn.onnx", case["paths"]["qkvd"], "-o", out)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "query" in err and "--base-weights" in err
        assert not out.exists()


def test_dora_inject_is_refused_in_one_line(case, tmp_path):
    out = tmp_path / "inj"
    code, _, err = _cli(
        "inject", case["root"] / "attn.onnx", case["paths"]["qv_dora"], "-o", out, "--base-weights", case["weights"]
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "DoRA" in err and "query" in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["qkvd", "qv_dora"])
def test_multi_head_attention_keeps_qkv_matmuls_targetable(case, tmp_path, name):
    """MultiHeadAttention takes the q/k/v MatMuls' outputs: they resolve by name (base weights only prove the
    pooler absent for "dense"); merge and inject are exact."""
    model = case["root"] / "mha.onnx"
    bw = ["--base-weights", case["weights"]] if name == "qkvd" else []
    code, _, err = _cli("merge", model, case["paths"][name], "-o", tmp_path / "m.onnx", *bw)
    assert code == 0, err
    assert _rel_err(run_plain(tmp_path / "m.onnx", case["feeds"])[0], case["refs"][name]) <= 1e-5
    if name == "qkvd":
        code, _, err = _cli("inject", model, case["paths"][name], "-o", tmp_path / "inj", *bw)
        assert code == 0, err
        got = run_injected(tmp_path / "inj" / "model.onnx", tmp_path / "inj" / f"{name}.onnx_adapter", case["feeds"])
        assert _rel_err(got[0], case["refs"][name]) <= 1e-5
        np.testing.assert_array_equal(run_plain(tmp_path / "inj" / "model.onnx", case["feeds"])[0], case["outs"]["mha"])


@pytest.mark.parametrize("with_weights", [True, False], ids=["base-weights", "names"])
def test_biases_packed_into_multi_head_attention_are_refused(case, tmp_path, with_weights):
    """q/v biases live in MultiHeadAttention's packed bias: never proven absent (that merge used to exit 0,
    1.2e-2 off PEFT), refused in one line."""
    bw = ["--base-weights", case["weights"]] if with_weights else []
    out = tmp_path / "m.onnx"
    code, _, err = _cli("merge", case["root"] / "mha.onnx", case["paths"]["qvd_bias"], "-o", out, *bw)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "attention.self.query.bias" in err and not out.exists()


class _QKV(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(8, 8, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


def test_twin_session_strips_genai_packed_slice_branches(tmp_path):
    """The branch-free twin also finds a genai ``qkv_proj`` slice's branch, whose B′ goes through a Pad."""
    torch.manual_seed(0)
    m = _QKV().eval()
    packed_attention(m, tmp_path / "model.onnx")
    save_file({k: v.detach().numpy().copy() for k, v in m.state_dict().items()}, str(tmp_path / "w.st"))
    peft_model = peft_reference(m, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "inj"
    code, _, err = _cli(
        "inject", tmp_path / "model.onnx", tmp_path / "adapter", "-o", out, "--base-weights", tmp_path / "w.st"
    )
    assert code == 0, err
    sess = LoraSession(out / "model.onnx", providers=["CPUExecutionProvider"], base_session=True)
    sess.load_adapter("a", out / "adapter.onnx_adapter")
    x = torch.randn(2, 8)
    with torch.no_grad():
        ref, base = peft_model(x).numpy(), m(x).numpy()
    assert _rel_err(sess.run(None, {"x": x.numpy()}, adapter="a")[0], ref) <= 1e-5
    np.testing.assert_array_equal(
        sess.run(None, {"x": x.numpy()})[0], run_plain(tmp_path / "model.onnx", {"x": x.numpy()})[0]
    )
    assert _rel_err(sess.run(None, {"x": x.numpy()})[0], base) <= 1e-6

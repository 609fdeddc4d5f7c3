"""Low-precision initializers: ΔW in float32, added in float32, rounded once into fp16/bf16 — checked
against the same computation in plain PyTorch, for each op layout (MatMul Wᵀ, Gemm transB=1, Gather)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
import torch

from lora_export import Adapter, LoraConfig, LoraTarget, merge_adapter

IN, OUT, VOCAB, R = 24, 16, 30, 4
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _graph(dtype: str, rng: np.random.Generator) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """ids → Gather(table) → MatMul(Wq ᵀ) → Gemm(Wv, transB=1): one weight per layout, in ``dtype``."""
    np_dtype = NP_DTYPES[dtype]
    weights = {
        "emb.weight": rng.standard_normal((VOCAB, IN)).astype(np_dtype),
        "q.weight": rng.standard_normal((IN, OUT)).astype(np_dtype),  # MatMul stores Wᵀ
        "v.weight": rng.standard_normal((OUT, OUT)).astype(np_dtype),  # Gemm transB=1 stores W
    }
    inits = {k: ir.Value(name=k, const_value=ir.tensor(v, name=k)) for k, v in weights.items()}
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([5]))
    gather = ir.node("Gather", [inits["emb.weight"], ids], name="/emb/Gather")
    matmul = ir.node("MatMul", [gather.outputs[0], inits["q.weight"]], name="/q/MatMul")
    gemm = ir.node("Gemm", [matmul.outputs[0], inits["v.weight"]], attributes={"transB": 1}, name="/v/Gemm")
    graph = ir.Graph(
        [ids], gemm.outputs, nodes=[gather, matmul, gemm], initializers=list(inits.values()), opset_imports={"": 17}
    )
    return ir.Model(graph, ir_version=9), weights


def _adapter(rng: np.random.Generator) -> Adapter:
    def rand(*s):
        return rng.standard_normal(s).astype(np.float32)

    targets = {
        "emb": LoraTarget("emb", "embedding", A=rand(R, VOCAB), B=rand(IN, R), scale=0.5),
        "q": LoraTarget("q", "linear", A=rand(R, IN), B=rand(OUT, R), scale=0.5),
        "v": LoraTarget("v", "linear", A=rand(R, OUT), B=rand(OUT, R), scale=0.5),
    }
    return Adapter(targets=targets, config=LoraConfig(r=R, lora_alpha=2.0), name="lowp")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_weights_round_once(dtype):
    rng = np.random.default_rng(7)
    model, weights = _graph(dtype, rng)
    adapter = _adapter(rng)
    report = merge_adapter(model, adapter)
    assert len(report.merged) == 3

    tdt = TORCH_DTYPES[dtype]
    for name, t in adapter.targets.items():
        a, b = torch.from_numpy(t.A), torch.from_numpy(t.B)
        w0 = torch.from_numpy(weights[f"{name}.weight"].astype(np.float32))
        if name == "emb":
            want = (w0 + (b @ a).T * t.scale).to(tdt)
        elif name == "q":
            want = (w0 + (b @ a).T * t.scale).to(tdt)  # stored transposed
        else:
            want = (w0 + (b @ a) * t.scale).to(tdt)
        got = model.graph.initializers[f"{name}.weight"].const_value.numpy()
        assert got.dtype == NP_DTYPES[dtype]
        got_t = torch.from_numpy(got.astype(np.float32)).to(tdt)
        # the delta is not negligible at this precision, so a skipped merge would fail here
        assert not torch.equal(got_t, w0.to(tdt))
        # exactly one rounding of the float32 sum: equal to torch's fp32 computation rounded once
        assert torch.equal(got_t, want), f"{name}: {(got_t.float() - want.float()).abs().max()}"

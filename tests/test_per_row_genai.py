"""``inject --per-row`` on onnxruntime-genai's builder output: a tiny LLaMA (random init, an offline
tokenizer) through ``python -m onnxruntime_genai.models.builder``, fp32 and int4 — GroupQueryAttention,
q/k/v packed into one ``qkv_proj`` MatMul (int4: ``MatMulNBits``), the builder's past/present names.

Every row of one batch runs its own adapter (different ranks and target sets, rsLoRA, DoRA) or none, in a
prefill and in a decode step over a random past; each row against PEFT with that row's adapter alone, rows
without adapter bit-identical to the builder's file in plain ONNX Runtime. int4: the reference is PEFT on
the dequantized weights (QLoRA), with the built MatMulNBits set to ``accuracy_level=1`` (float
activations); the builder's CPU default (4) quantizes activations to int8 inside MatMulNBits, which no
float reference reproduces exactly, so that build is checked row by row against the same rows run alone.
Skipped where onnxruntime-genai is not installed."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import peft_reference
from per_row_fixtures import check_rows, cli_run, cpu_session, rel

pytest.importorskip("onnxruntime_genai.models.builder")

from test_genai_runtime import VOCAB, _build, _tokenizer  # noqa: E402

from lora_export.graph.slots.per_row import IDS_INPUT  # noqa: E402

LAYERS, KV_HEADS, HEAD = 2, 2, 16
ADAPTERS = {  # different ranks and targets; q/k/v land in the packed qkv_proj
    "qkv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
    "vdown": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], use_rslora=True),
    "oup": dict(r=3, lora_alpha=5, target_modules=["o_proj", "up_proj"], use_dora=True),
}
ROWS = ["qkv", None, "vdown", "oup", "qkv"]
OUTPUTS = ["logits", *(f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value"))]  # as hf_step's


def _dequantized(base: torch.nn.Module, path) -> torch.nn.Module:
    """``base`` with the builder's int4 weights dequantized (ORT's own rule, the int4 plugin's read); the
    packed qkv_proj split by the q/k/v widths."""
    import onnx_ir as ir
    from lora_export_plugins import int4

    from lora_export.graph.ops.layouts import get_layout

    int4.register()
    model = copy.deepcopy(base)
    for node in ir.load(str(path)).graph:
        if node.op_type != "MatMulNBits":
            continue
        w = torch.from_numpy(get_layout(node).read(node))  # (out, in)
        name = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".").replace(".attn.", ".self_attn.")
        if name.endswith("qkv_proj"):
            parts = [model.get_submodule(name.replace("qkv_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        else:
            parts = [model.get_submodule(name)]
        cuts = np.cumsum([0] + [m.weight.shape[0] for m in parts])
        with torch.no_grad():
            for m, a, b in zip(parts, cuts[:-1], cuts[1:], strict=True):
                m.weight.copy_(w[a:b])
    return model


def _float_activations(src, dst) -> None:
    """The builder's int4 folder with MatMulNBits' accuracy_level set to 1 (fp32 activations); weights unchanged."""
    import shutil

    import onnx

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 1
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The builder's fp32 and int4 folders (int4 also with float activations, "int4-acc1"), each with its
    PEFT adapters (int4: trained on the dequantized base) and the per-row model injected with all of them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("per-row-genai")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "hf")
    _tokenizer(root / "hf")
    for precision in ("fp32", "int4"):
        _build(root / "hf", root / precision, root / "cache", precision=precision)
    _float_activations(root / "int4", root / "int4-acc1")
    deq = _dequantized(base, root / "int4" / "model.onnx")
    out = {}
    for kind, ref_base in (("fp32", base), ("int4", deq)):
        peft = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, (name, config) in enumerate(ADAPTERS.items()):
                peft[name] = peft_reference(ref_base, seed=80 + i, **config)
                peft[name].save_pretrained(str(root / f"{kind}-{name}"))
        out[kind] = {"peft": peft}
    for kind, adapters in (("fp32", "fp32"), ("int4", "int4"), ("int4-acc1", "int4")):
        named = [f"{n}={root / f'{adapters}-{n}'}" for n in ADAPTERS]
        weights = root / "hf" / "model.safetensors"  # the packed qkv_proj resolves by value
        code, _, err = cli_run(
            "inject", root / kind / "model.onnx", *named, "-o", root / f"{kind}-rows", "--per-row",
            "--base-weights", weights,
        )  # fmt: skip
        assert code == 0, err
        out[kind] = {"folder": root / kind, "rows": root / f"{kind}-rows", "peft": out[adapters]["peft"]}
    return out


def _step(batch: int, past_len: int, new: int, seed: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The builder's feeds for one step (random tokens, a random past: fresh values, never zeros) and the past
    as a list [k0, v0, k1, v1]."""
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(4, VOCAB, (batch, new), dtype=np.int64),
        "attention_mask": np.ones((batch, past_len + new), dtype=np.int64),
    }
    past = []
    for i in range(LAYERS):
        for kv in ("key", "value"):
            t = rng.standard_normal((batch, KV_HEADS, past_len, HEAD)).astype(np.float32)
            feeds[f"past_key_values.{i}.{kv}"] = t
            past.append(t)
    return feeds, past


def _ids(folder, rows) -> np.ndarray:
    from test_per_row import _pool_feeds

    return np.array([_pool_feeds(folder)[1][r] if r else 0 for r in rows], dtype=np.int64)


@pytest.mark.parametrize("kind", ["fp32", "int4-acc1"])
@pytest.mark.parametrize("step", [(0, 5), (4, 1)], ids=["prefill", "decode"])
def test_rows_equal_peft_alone_on_the_builders_model(built, kind, step):
    from test_per_row import _pool_feeds

    case = built[kind]
    pool, _ = _pool_feeds(case["rows"])
    feeds, past = _step(len(ROWS), *step, seed=31 + step[0])
    got = cpu_session(case["rows"] / "model.onnx").run(OUTPUTS, {**feeds, **pool, IDS_INPUT: _ids(case["rows"], ROWS)})
    base_out = cpu_session(case["folder"] / "model.onnx").run(OUTPUTS, feeds)

    def one(i):
        return feeds["input_ids"][i : i + 1], feeds["attention_mask"][i : i + 1], [p[i : i + 1] for p in past]

    check_rows(case["peft"], got, one, ROWS, base_out)


def test_builders_default_int4_rows_equal_the_same_rows_alone(built):
    """accuracy_level 4 (the builder's CPU default): int8 activations inside MatMulNBits. Each row of a mixed
    batch equals that row run alone with its adapter, and rows without adapter are the builder's file."""
    from test_per_row import _pool_feeds

    case = built["int4"]
    pool, _ = _pool_feeds(case["rows"])
    feeds, _ = _step(len(ROWS), 3, 1, seed=41)  # GQA: batch > 1 over a past takes one token
    sess = cpu_session(case["rows"] / "model.onnx")
    ids = _ids(case["rows"], ROWS)
    got = sess.run(OUTPUTS, {**feeds, **pool, IDS_INPUT: ids})
    base_out = cpu_session(case["folder"] / "model.onnx").run(OUTPUTS, feeds)
    for i, row in enumerate(ROWS):
        if row is None:
            for g, b in zip(got, base_out, strict=True):
                np.testing.assert_array_equal(g[i], b[i])
            continue
        alone = sess.run(OUTPUTS, {**{k: v[i : i + 1] for k, v in feeds.items()}, **pool, IDS_INPUT: ids[i : i + 1]})
        for g, a in zip(got, alone, strict=True):
            assert rel(g[i], a[0]) <= 1e-5, (i, row)
        assert rel(got[0][i], base_out[0][i]) > 1e-3, (i, row)  # the adapter matters


def test_lora_session_serves_the_builders_per_row_model(built):
    """``LoraSession(adapters=[...])`` on the builder's per-row model, its adapters loaded from inject's files:
    the same rows as plain ONNX Runtime fed pool.safetensors."""
    from test_per_row import _pool_feeds

    from lora_export.runtime.session import LoraSession

    case = built["fp32"]
    sess = LoraSession(case["rows"] / "model.onnx", providers=["CPUExecutionProvider"], pool_size=8)
    for name in ADAPTERS:
        sess.load_adapter(name, case["rows"] / f"{name}.onnx_adapter")
    feeds, _ = _step(len(ROWS), 2, 1, seed=71)
    got = sess.run(OUTPUTS, feeds, adapters=ROWS)
    pool, _ = _pool_feeds(case["rows"])
    plain = cpu_session(case["rows"] / "model.onnx").run(
        OUTPUTS, {**feeds, **pool, IDS_INPUT: _ids(case["rows"], ROWS)}
    )
    for g, p in zip(got, plain, strict=True):
        np.testing.assert_allclose(g, p, rtol=0, atol=1e-6)
    base_out = cpu_session(case["folder"] / "model.onnx").run(OUTPUTS, feeds)
    assert ROWS[1] is None and np.array_equal(got[0][1], base_out[0][1])
    assert rel(got[0][0], base_out[0][0]) > 1e-3  # the adapter is applied

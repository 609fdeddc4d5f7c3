"""``inject --per-row`` on REAL Optimum exports (``optimum-onnx``'s ``main_export``):

- a tiny random-init LLaMA, task ``text-generation-with-past``: one ``model.onnx`` with
  ``past_key_values.*`` inputs and ``present.*`` outputs (this Optimum writes no merged decoder for
  decoder-only models), in a prefill (empty past) and a decode step over a random past;
- Optimum's merged decoder ``decoder_model_merged.onnx`` of a tiny BART (an ``If`` over the no-cache and
  cache branches): the whole sequence without cache, and the last token over each row's own prefill caches.

Every row of one batch runs its own adapter (different ranks and target sets, rsLoRA, DoRA) or none, against
PEFT with that row's adapter alone on the weights Optimum exported (``hf/``); rows without adapter
bit-identical to Optimum's file in plain ONNX Runtime.

The exports are made in the side venv by ``make optimum-graphs`` (tests/side/optimum_export.sh; ``make
test`` runs it first); as in tests/test_optimum_multi_file.py, a missing export fails, naming that target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from per_row_fixtures import check_rows, cli_run, cpu_session, rel, saved_peft_adapters
from test_optimum_multi_file import _graphs

from lora_export.graph.slots.per_row import IDS_INPUT

ROOT = Path(__file__).parent / ".optimum-graphs" / "llama"
LAYERS, KV_HEADS, HEAD, VOCAB = 2, 2, 8, 96  # tests/side/optimum_export.py's LLaMA
OUTPUTS = ["logits", *(f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value"))]
ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "kdown": dict(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"], use_rslora=True),
    "odora": dict(r=3, lora_alpha=5, target_modules=["o_proj", "gate_proj"], use_dora=True),
}
ROWS = ["kdown", None, "qv", "odora", "qv"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    import warnings

    from transformers import AutoModelForCausalLM

    _graphs("llama")  # missing: fails, naming `make optimum-graphs` (as tests/test_optimum_multi_file.py)
    root = tmp_path_factory.mktemp("per-row-optimum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(ROOT / "hf").eval()
    peft = saved_peft_adapters(root, base, ADAPTERS, seed=90)
    code, _, err = cli_run(
        "inject", ROOT / "onnx" / "model.onnx", *(f"{n}={root / n}" for n in ADAPTERS), "-o", root / "rows",
        "--per-row",
    )  # fmt: skip
    assert code == 0, err
    return {"root": root, "peft": peft, "rows": root / "rows"}


def _step(batch: int, past_len: int, new: int, seed: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Optimum's feeds for one step (random tokens, a random past: fresh values, never zeros), and the past."""
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(3, VOCAB, (batch, new), dtype=np.int64),
        "attention_mask": np.ones((batch, past_len + new), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + new), (batch, new)).copy(),
    }
    past = []
    for i in range(LAYERS):
        for kv in ("key", "value"):
            past.append(rng.standard_normal((batch, KV_HEADS, past_len, HEAD)).astype(np.float32))
            feeds[f"past_key_values.{i}.{kv}"] = past[-1]
    return feeds, past


@pytest.mark.parametrize("step", [(0, 6), (5, 1)], ids=["prefill", "decode"])
def test_rows_equal_peft_alone_on_optimums_decoder_with_past(case, step):
    from test_per_row import _pool_feeds

    pool, ids_of = _pool_feeds(case["rows"])
    ids = np.array([ids_of[r] if r else 0 for r in ROWS], dtype=np.int64)
    feeds, past = _step(len(ROWS), *step, seed=51 + step[0])
    got = cpu_session(case["rows"] / "model.onnx").run(OUTPUTS, {**feeds, **pool, IDS_INPUT: ids})
    base_out = cpu_session(ROOT / "onnx" / "model.onnx").run(OUTPUTS, feeds)

    def one(i):
        return feeds["input_ids"][i : i + 1], feeds["attention_mask"][i : i + 1], [p[i : i + 1] for p in past]

    check_rows(case["peft"], got, one, ROWS, base_out)


# -- Optimum's merged decoder (decoder_model_merged.onnx: an If over the no-cache and cache branches) ----------

BART = ROOT.parent / "bart"
BART_ADAPTERS = {  # the decoder's own projections only: every row shares one encoder output
    "qv": dict(r=4, lora_alpha=8, target_modules=r".*decoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)"),
    "fc": dict(r=2, lora_alpha=4, target_modules=r".*decoder\.layers\.\d+\.(fc1|encoder_attn\.q_proj)"),
    "vo": dict(r=3, lora_alpha=3, target_modules=r".*decoder\.layers\.\d+\.self_attn\.(v_proj|out_proj)"),
}
BART_ROWS = ["fc", None, "qv", "vo"]


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    import warnings

    import torch
    from transformers import AutoModelForSeq2SeqLM

    _graphs("bart")
    root = tmp_path_factory.mktemp("per-row-optimum-merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForSeq2SeqLM.from_pretrained(BART / "hf").eval()
    peft = saved_peft_adapters(root, base, BART_ADAPTERS, seed=95)
    merged = BART / "onnx" / "decoder_model_merged.onnx"
    code, _, err = cli_run(
        "inject", merged, *(f"{n}={root / n}" for n in BART_ADAPTERS), "-o", root / "rows", "--per-row",
        "--base-weights", BART / "hf" / "model.safetensors",
    )  # fmt: skip
    assert code == 0, err
    rng = np.random.default_rng(61)
    mask = np.ones((len(BART_ROWS), 7), dtype=np.int64)
    mask[1, -2:] = 0  # padding in one row
    enc = {"input_ids": rng.integers(3, 96, (len(BART_ROWS), 7), dtype=np.int64), "attention_mask": mask}
    dec = rng.integers(3, 96, (len(BART_ROWS), 5), dtype=np.int64)
    with torch.no_grad():
        hidden = base.get_encoder()(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
    return {"root": root, "peft": peft, "base": base, "merged": merged, "enc": enc, "dec": dec, "hidden": hidden}


def _bart_ref(model, enc: dict, dec: np.ndarray, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Row i alone through ``model`` (PEFT or the base): full-sequence logits, and the caches of a prefill of
    all but the last token under Optimum's input names."""
    import torch

    t = {k: torch.from_numpy(v[i : i + 1]) for k, v in enc.items()}
    d = torch.from_numpy(dec[i : i + 1])
    with torch.no_grad():
        logits = model(**t, decoder_input_ids=d, use_cache=False).logits.numpy()
        cache = model(**t, decoder_input_ids=d[:, :-1], use_cache=True).past_key_values
    past = {}
    for n, (s, c) in enumerate(zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers)):
        for kind, layer in (("decoder", s), ("encoder", c)):
            past[f"past_key_values.{n}.{kind}.key"] = layer.keys.numpy()
            past[f"past_key_values.{n}.{kind}.value"] = layer.values.numpy()
    return logits, past


def test_rows_equal_peft_alone_in_both_branches_of_optimums_merged_decoder(bart):
    """No-cache branch on the whole sequence; cache branch for the last token over each row's own prefill
    caches (computed by PEFT with that row's adapter alone)."""
    from test_per_row import _pool_feeds

    enc, dec, rows = bart["enc"], bart["dec"], BART_ROWS
    pool, ids_of = _pool_feeds(bart["root"] / "rows")
    ids = np.array([ids_of[r] if r else 0 for r in rows], dtype=np.int64)
    refs = [_bart_ref(bart["peft"][r] if r else bart["base"], enc, dec, i) for i, r in enumerate(rows)]
    past = {k: np.concatenate([p[k] for _, p in refs]) for k in refs[0][1]}
    common = {"encoder_attention_mask": enc["attention_mask"], "encoder_hidden_states": bart["hidden"]}
    empty = {k: (v[:, :, :0] if ".decoder." in k else v) for k, v in past.items()}  # as Optimum feeds
    steps = {
        "no-cache": ({**common, **empty, "input_ids": dec, "use_cache_branch": np.array([False])}, slice(None)),
        "cache": ({**common, **past, "input_ids": dec[:, -1:], "use_cache_branch": np.array([True])}, slice(-1, None)),
    }
    rows_sess = cpu_session(bart["root"] / "rows" / "model.onnx")
    base_sess = cpu_session(bart["merged"])
    for branch, (feeds, last) in steps.items():
        got = rows_sess.run(["logits"], {**feeds, **pool, IDS_INPUT: ids})[0]
        base_out = base_sess.run(["logits"], feeds)[0]
        for i, row in enumerate(rows):
            if row is None:
                np.testing.assert_array_equal(got[i], base_out[i])
                continue
            ref = refs[i][0][0, last]
            assert rel(got[i], ref) <= 1e-5, (branch, i, row, rel(got[i], ref))
            assert rel(got[i], base_out[i]) > 1e-3, (branch, i, row)  # the adapter matters

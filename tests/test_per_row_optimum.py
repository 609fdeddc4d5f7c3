"""``inject --per-row`` on a REAL Optimum export (``optimum-onnx``'s ``main_export``, task
``text-generation-with-past``) of a tiny random-init LLaMA: one ``model.onnx`` with ``past_key_values.*``
inputs and ``present.*`` outputs (this Optimum makes no separate merged decoder for decoder-only models; the
merged form is covered by tests/test_per_row.py's ``If``-wrapped decoder).

Every row of one batch runs its own adapter (different ranks and target sets, rsLoRA, DoRA) or none, in a
prefill (empty past) and a decode step over a random past, against PEFT with that row's adapter alone on the
weights Optimum exported (``hf/``); rows without adapter bit-identical to Optimum's file in plain ONNX Runtime.

The export is made in the side venv by ``make optimum-graphs`` (tests/side/optimum_export.sh); without it
these tests skip, saying so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from per_row_fixtures import check_rows, cli_run, saved_peft_adapters

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


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    import warnings

    from transformers import AutoModelForCausalLM

    if not (ROOT / "COMPLETE").is_file():
        pytest.skip(f"no Optimum export in {ROOT}: run `make optimum-graphs` (or `make test`)")
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
    got = _session(case["rows"] / "model.onnx").run(OUTPUTS, {**feeds, **pool, IDS_INPUT: ids})
    base_out = _session(ROOT / "onnx" / "model.onnx").run(OUTPUTS, feeds)

    def one(i):
        return feeds["input_ids"][i : i + 1], feeds["attention_mask"][i : i + 1], [p[i : i + 1] for p in past]

    check_rows(case["peft"], got, one, ROWS, base_out)

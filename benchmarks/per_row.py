"""Per-row adapters (``inject --per-row``): 8 different adapters in one batch vs the other ways to serve them.

A ~150M LLaMA (random init, fp32, built from a config), 8 PEFT adapters at r=16 on q_proj/v_proj, batch 8,
exported with its KV cache. Two steps: prefill of 128 tokens, and decode of 1 token over a 128-token past.
Routes:
  (a)   ``LoraSession.run(adapters=[a0..a7])``: 8 different adapters in one batch
  (b)   ``LoraSession.run(adapter="a0")``: one adapter for every row (ids of shape (1,), broadcast)
  (c)   8 calls of batch 1, each with its row's adapter (the single-adapter way; decode only)
  (a64) (a) on a session with 64 adapters resident instead of 8
  (d)   PEFT ``adapter_names=[a0..a7]`` in PyTorch, and PEFT with one active adapter (its own (a)/(b))
  base  the per-row model with no adapter
Every row of (a) is checked against PEFT with that row's adapter alone. Latencies are medians over
interleaved repetitions (each rep runs every route once). Results: a table, and JSON with machine details
in benchmarks/results/per_row-<host>-<date>.json.

Run: .venv/bin/python benchmarks/per_row.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from _common import machine_details, print_table, write_results  # noqa: E402

from lora_export import LoraSession, inject_files  # noqa: E402
from lora_export.formats.adapter_files import read_adapter_tensors  # noqa: E402

FULL = dict(hidden=768, layers=12, heads=12, kv=4, intermediate=3072, vocab=32000)  # ~150M parameters
QUICK = dict(hidden=256, layers=2, heads=4, kv=2, intermediate=704, vocab=4000)
BATCH, PROMPT, PAST, RANK, ADAPTERS, RESIDENT = 8, 128, 128, 16, 8, 64


class WithPast(torch.nn.Module):
    """input_ids, attention_mask, position_ids, past k/v per layer → logits, present k/v per layer."""

    def __init__(self, model, layers: int) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, position_ids, *past, **kw):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **kw,
        )
        present = []
        for i in range(self.layers):
            present += [out.past_key_values.layers[i].keys, out.past_key_values.layers[i].values]
        return (out.logits, *present)


def step(cfg: dict, batch: int, past: int, new: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    head = cfg["hidden"] // cfg["heads"]
    inputs = {
        "input_ids": torch.randint(0, cfg["vocab"], (batch, new), generator=g),
        "attention_mask": torch.ones(batch, past + new, dtype=torch.int64),
        "position_ids": torch.arange(past, past + new).expand(batch, new).contiguous(),
    }
    for i in range(cfg["layers"]):
        for kv in ("key", "value"):
            inputs[f"past.{i}.{kv}"] = torch.randn(batch, cfg["kv"], past, head, generator=g)
    return inputs


def build(cfg: dict, work: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv"],
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    base = LlamaForCausalLM(conf).eval()
    example = step(cfg, 2, 3, 2, seed=0)
    names = list(example)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}}
    dyn["position_ids"] = {0: "batch", 1: "seq"}
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(cfg["layers"]) for kv in ("key", "value")]
    dyn.update({n: {0: "batch", 2: "past"} for n in names[3:]})
    dyn.update({n: {0: "batch", 2: "total"} for n in outs[1:]})
    t = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            WithPast(copy.deepcopy(base), cfg["layers"]),
            tuple(example[n] for n in names),
            str(work / "base.onnx"),
            input_names=names,
            output_names=outs,
            dynamic_axes=dyn,
            dynamo=False,
            opset_version=17,
        )
    export_s = time.perf_counter() - t
    lc = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    adapters = [f"a{i}" for i in range(ADAPTERS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(**lc), adapter_name=adapters[0])
        for name in adapters[1:]:
            peft.add_adapter(name, LoraConfig(**lc))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.save_pretrained(str(work / "peft"), selected_adapters=adapters)
    dirs = [work / "peft" / a for a in adapters]  # PEFT saves a named adapter in its own subfolder
    t = time.perf_counter()
    inject_files(work / "base.onnx", dirs, work / "served", names=adapters, per_row=True)
    inject_s = time.perf_counter() - t
    return base, peft, adapters, {"export_s": round(export_s, 1), "inject_s": round(inject_s, 1)}


def measure(cfg, past, new, reps, sessions, peft, base, adapters, peft_reps) -> tuple[dict, dict]:
    """One step (prefill or decode): exactness of (a) per row vs PEFT, then every route, interleaved."""
    sess8, sess64 = sessions
    inputs = step(cfg, BATCH, past, new, seed=5)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    rows = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(BATCH)]
    wrapped = WithPast(peft, cfg["layers"])
    got = sess8.run(["logits"], feeds, adapters=adapters)[0]
    errs = []
    with torch.no_grad():
        for i, a in enumerate(adapters):
            peft.set_adapter(a)
            ref = wrapped(*(v[i : i + 1] for v in inputs.values()))[0][0].numpy()
            errs.append(float(np.abs(got[i] - ref).max() / np.abs(ref).max()))
        peft.set_adapter(adapters[0])
        base_ref = WithPast(base, cfg["layers"])(*(v[:1] for v in inputs.values()))[0][0].numpy()
    none = sess8.run(["logits"], feeds)[0]
    checks = {"max_rel_err_vs_peft": max(errs), "none_vs_torch_base_abs": float(np.abs(none[0] - base_ref).max())}

    def peft_run(names=None):
        kw = {} if names is None else {"adapter_names": names}
        with torch.no_grad():
            wrapped(*inputs.values(), **kw)

    routes = {
        "a_mixed": lambda: sess8.run(None, feeds, adapters=adapters),
        "b_one": lambda: sess8.run(None, feeds, adapter=adapters[0]),
        "c_8_calls": lambda: [sess8.run(None, rows[i], adapter=adapters[i]) for i in range(BATCH)],
        "a64_mixed_64_resident": lambda: sess64.run(None, feeds, adapters=adapters),
        "base_no_adapter": lambda: sess8.run(None, feeds),
        "peft_mixed": lambda: peft_run(adapters),
        "peft_one": lambda: peft_run(),
    }
    if past == 0:  # prefill: (c) costs what (a) costs 8 times over at 1/8 the rows; its point is decode
        del routes["c_8_calls"]
    for k, fn in routes.items():  # warm-up (PyTorch only when it is timed more than once)
        if not k.startswith("peft") or peft_reps > 1:
            print(f"  warm-up {'decode' if past else 'prefill'} {k}", file=sys.stderr, flush=True)
            fn()
    times: dict[str, list[float]] = {k: [] for k in routes}
    for rep in range(reps):
        for k, fn in routes.items():
            if k.startswith("peft") and rep >= peft_reps:
                continue
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    results = {k: statistics.median(v) * 1000 for k, v in times.items()}
    results["reps"] = reps
    return results, checks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a small model, few reps (a smoke run)")
    ap.add_argument("--steps", default="decode,prefill", help="which steps to measure (comma-separated)")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--peft-reps", type=int, default=None, help="PyTorch reps (default: as ours)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    reps = {"prefill": args.prefill_reps, "decode": 5 if args.quick else 12}  # prefill: seconds per call
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, peft, adapters, build_times = build(cfg, work)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 2
        model = work / "served" / "model.onnx"
        sess8 = LoraSession(model, providers=["CPUExecutionProvider"], sess_options=so)
        sess64 = LoraSession(model, providers=["CPUExecutionProvider"], sess_options=so)
        for a in adapters:
            sess8.load_adapter(a, work / "served" / f"{a}.onnx_adapter")
        t = time.perf_counter()
        for a in adapters:
            sess64.load_adapter(a, work / "served" / f"{a}.onnx_adapter")
        load_s = (time.perf_counter() - t) / len(adapters)
        extra = read_adapter_tensors(work / "served" / f"{adapters[0]}.onnx_adapter")
        for i in range(RESIDENT - ADAPTERS):  # other resident adapters: a0's tensors rescaled
            sess64.load_adapter(f"x{i}", {k: v * np.float32(1 + i / 100) for k, v in extra.items()})
        pool_mb = sum(v.nbytes for v in sess64.pool._arrays.values()) / 2**20
        results, checks = {}, {}
        steps = {"decode": (PAST, 1), "prefill": (0, PROMPT)}
        for phase in args.steps.split(","):
            past, new = steps[phase]
            peft_reps = args.peft_reps or reps[phase]
            results[phase], checks[phase] = measure(
                cfg, past, new, reps[phase], (sess8, sess64), peft, base, adapters, peft_reps
            )
            print(f"{phase}: {results[phase]} {checks[phase]}", file=sys.stderr, flush=True)
    table, ratios = [], {}
    for phase, r in results.items():
        ratios[phase] = {
            "throughput_a_over_b": r["b_one"] / r["a_mixed"],
            "a_speedup_over_c": r["c_8_calls"] / r["a_mixed"] if "c_8_calls" in r else None,
            "a64_over_a8_time": r["a64_mixed_64_resident"] / r["a_mixed"],
            "a_over_base_time": r["a_mixed"] / r["base_no_adapter"],
            "peft_throughput_mixed_over_one": r["peft_one"] / r["peft_mixed"],
        }
        for k in [k for k in r if k != "reps"]:
            table.append([phase, k, f"{r[k]:.1f}"])
    print_table(["step", "route", "median ms"], table)
    print()
    print_table(
        ["step", *next(iter(ratios.values())).keys()],
        [[p, *("-" if v is None else f"{v:.3f}" for v in rs.values())] for p, rs in ratios.items()],
    )
    print("checks:", checks)
    data = {
        "machine": machine_details(),
        "config": {
            **cfg,
            "batch": BATCH,
            "prompt": PROMPT,
            "past": PAST,
            "rank": RANK,
            "targets": ["q_proj", "v_proj"],
        },
        "quick": args.quick,
        "peft_reps": args.peft_reps,
        "median_ms": results,
        "ratios": ratios,
        "checks": checks,
        "build": {**build_times, "load_adapter_s": round(load_s, 3), "pool_mb_64": round(pool_mb, 1)},
    }
    print("wrote", write_results("per_row" + ("-quick" if args.quick else ""), data))


if __name__ == "__main__":
    main()

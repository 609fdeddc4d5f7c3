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
Checks: every row of (a) against PEFT with that row's adapter alone; rows without an adapter (all rows, and
the None rows of a batch mixing adapters and None) against plain ONNX Runtime on the exported base model.

Four figures per route and repetition, all from the same call: wall time; the process's CPU time (all
threads; ORT's workers do not spin, so this is work done); the calling thread's CPU time (with ``--threads 1``
ONNX Runtime and PyTorch compute on that thread, so this is all the work, and a thread that waits for the
core does not count: the steadiest figure on a shared machine); the sum of node kernel times in ONNX
Runtime's profiler (wall time inside kernels; PyTorch routes: none). On a shared machine whole-step wall
time moves by several percent from rep to rep; CPU times move less. Each rep runs every route once, in an
order rotated per rep; ratios are medians of per-rep ratios (with their quartiles). Results: a table, and
JSON with machine details and load averages in benchmarks/results/per_row[-<N>thread]-<host>-<date>.json
(``-<N>thread`` when ``--threads`` is not 1, the default).

Run: .venv/bin/python benchmarks/per_row.py [--quick] [--workdir DIR] [--decode-reps N] [--prefill-reps N]
     [--peft-reps N] [--threads N] [--no-profile]
``--workdir``: keep the exported and injected model and the adapters there and reuse them on the next run
(the build is deterministic; the exactness checks confirm a reused one).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # PyTorch's idle threads must not spin into our CPU time

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import _ort_profile  # noqa: E402
from _common import machine_details, print_table, write_results  # noqa: E402

from lora_export import LoraSession, inject_files  # noqa: E402
from lora_export.formats.adapter_files import read_adapter_tensors  # noqa: E402

FULL = dict(hidden=768, layers=12, heads=12, kv=4, intermediate=3072, vocab=32000)  # ~150M parameters
QUICK = dict(hidden=256, layers=2, heads=4, kv=2, intermediate=704, vocab=4000)
BATCH, PROMPT, PAST, RANK, ADAPTERS, RESIDENT = 8, 128, 128, 16, 8, 64
# ratio name → (numerator route, denominator route), per rep
RATIOS = {
    "throughput_a_over_b": ("b_one", "a_mixed"),
    "a_speedup_over_c": ("c_8_calls", "a_mixed"),
    "a64_over_a8_time": ("a64_mixed_64_resident", "a_mixed"),
    "a_over_base_time": ("a_mixed", "base_no_adapter"),
    "b_over_base_time": ("b_one", "base_no_adapter"),
    "peft_throughput_mixed_over_one": ("peft_one", "peft_mixed"),
}
METRICS = ("wall", "cpu", "thread_cpu", "kernel")


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


def build(cfg: dict, work: Path) -> tuple:
    """The base model and the PEFT model with 8 adapters (in memory; deterministic), and in ``work`` the
    exported base ``base.onnx``, the PEFT adapters and the injected per-row model ``served/`` — reused when
    ``work/ready.json`` says they were built for ``cfg``."""
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
    ready = work / "ready.json"
    if ready.exists() and json.loads(ready.read_text()).get("config") == cfg:
        info = json.loads(ready.read_text())["build"]
        print(f"reusing the model and adapters in {work}", file=sys.stderr, flush=True)
        return base, peft, adapters, {**info, "reused": True}
    ready.unlink(missing_ok=True)
    for old in ("served", "peft"):
        shutil.rmtree(work / old, ignore_errors=True)
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.save_pretrained(str(work / "peft"), selected_adapters=adapters)
    dirs = [work / "peft" / a for a in adapters]  # PEFT saves a named adapter in its own subfolder
    t = time.perf_counter()
    inject_files(work / "base.onnx", dirs, work / "served", names=adapters, per_row=True)
    info = {"export_s": round(export_s, 1), "inject_s": round(time.perf_counter() - t, 1)}
    ready.write_text(json.dumps({"config": cfg, "build": info}))  # last: a half-built workdir is rebuilt
    return base, peft, adapters, {**info, "reused": False}


def options(threads: int = 2, profile: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    # Idle workers sleep instead of spinning: process CPU time then counts work, not waiting.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return _ort_profile.enable(so, profile) if profile else so


def sessions(
    work: Path, adapters: list[str], profile: str | None, threads: int
) -> tuple[_ort_profile.Traced, _ort_profile.Traced, dict]:
    """Sessions with the 8 adapters and with 64 resident (a0's tensors rescaled for the other 56)."""
    model, served = work / "served" / "model.onnx", work / "served"
    so8, so64 = (options(threads, f"{profile}_{n}" if profile else None) for n in (8, 64))
    sess8 = LoraSession(model, providers=["CPUExecutionProvider"], sess_options=so8)
    sess64 = LoraSession(model, providers=["CPUExecutionProvider"], sess_options=so64)
    for a in adapters:
        sess8.load_adapter(a, served / f"{a}.onnx_adapter")
    t = time.perf_counter()
    for a in adapters:
        sess64.load_adapter(a, served / f"{a}.onnx_adapter")
    load_s = (time.perf_counter() - t) / len(adapters)
    extra = read_adapter_tensors(served / f"{adapters[0]}.onnx_adapter")
    for i in range(RESIDENT - ADAPTERS):
        sess64.load_adapter(f"x{i}", {k: v * np.float32(1 + i / 100) for k, v in extra.items()})
    pool_mb = sum(v.nbytes for v in sess64.pool._arrays.values()) / 2**20
    info = {"load_adapter_s": round(load_s, 3), "pool_mb_64": round(pool_mb, 1)}
    return _ort_profile.Traced(sess8, profile is not None), _ort_profile.Traced(sess64, profile is not None), info


def checks(cfg, inputs, feeds, sess8: _ort_profile.Traced, peft, base, base_ort, adapters) -> dict:
    """Every row of (a) vs PEFT with that row's adapter alone; rows without an adapter vs the plain base."""
    wrapped = WithPast(peft, cfg["layers"])
    got = sess8.run(None, ["logits"], feeds, adapters=adapters)[0]
    errs = []
    with torch.no_grad():
        for i, a in enumerate(adapters):
            peft.set_adapter(a)
            ref = wrapped(*(v[i : i + 1] for v in inputs.values()))[0][0].numpy()
            errs.append(float(np.abs(got[i] - ref).max() / np.abs(ref).max()))
        peft.set_adapter(adapters[0])
        base_ref = WithPast(base, cfg["layers"])(*(v[:1] for v in inputs.values()))[0][0].numpy()
    plain = base_ort.run(["logits"], feeds)[0]
    none = sess8.run(None, ["logits"], feeds)[0]
    half = [a if i % 2 == 0 else None for i, a in enumerate(adapters)]
    mixed = sess8.run(None, ["logits"], feeds, adapters=half)[0]
    odd, even = slice(1, None, 2), slice(0, None, 2)
    return {
        "max_rel_err_vs_peft": max(errs),
        "none_vs_ort_base_abs": float(np.abs(none - plain).max()),
        "none_rows_of_mixed_vs_ort_base_abs": float(np.abs(mixed[odd] - plain[odd]).max()),
        "adapter_rows_of_mixed_vs_a_abs": float(np.abs(mixed[even] - got[even]).max()),
        "none_vs_torch_base_abs": float(np.abs(none[0] - base_ref).max()),
    }


def measure(cfg, past, new, reps, sess, peft, base, base_ort, adapters, peft_reps) -> tuple[dict, dict]:
    """One step (prefill or decode): the checks, then every route, interleaved, order rotated per rep.

    Returns ({metric: {route: [per-rep ms]}}, checks)."""
    sess8, sess64 = sess
    inputs = step(cfg, BATCH, past, new, seed=5)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    rows = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(BATCH)]
    found = checks(cfg, inputs, feeds, sess8, peft, base, base_ort, adapters)
    wrapped = WithPast(peft, cfg["layers"])

    def peft_run(names=None):
        kw = {} if names is None else {"adapter_names": names}
        with torch.no_grad():
            wrapped(*inputs.values(), **kw)

    routes = {
        "a_mixed": lambda lab: sess8.run(lab, None, feeds, adapters=adapters),
        "b_one": lambda lab: sess8.run(lab, None, feeds, adapter=adapters[0]),
        "c_8_calls": lambda lab: [sess8.run(lab, None, rows[i], adapter=adapters[i]) for i in range(BATCH)],
        "a64_mixed_64_resident": lambda lab: sess64.run(lab, None, feeds, adapters=adapters),
        "base_no_adapter": lambda lab: sess8.run(lab, None, feeds),
        "peft_mixed": lambda lab: peft_run(adapters),
        "peft_one": lambda lab: peft_run(),
    }
    if past == 0:  # prefill: (c) costs what (a) costs 8 times over at 1/8 the rows; its point is decode
        del routes["c_8_calls"]
    if peft_reps == 0:
        del routes["peft_mixed"], routes["peft_one"]
    for k, fn in routes.items():  # warm-up (PyTorch only when it is timed more than once)
        if not k.startswith("peft") or peft_reps > 1:
            print(f"  warm-up {'decode' if past else 'prefill'} {k}", file=sys.stderr, flush=True)
            fn(None)
    got: dict = {m: {k: [None] * reps for k in routes} for m in ("wall", "cpu", "thread_cpu")}
    names = list(routes)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for k in order:
            if k.startswith("peft") and rep >= peft_reps:
                continue
            c, tc, t = time.process_time(), time.thread_time(), time.perf_counter()
            routes[k]((k, rep))
            got["wall"][k][rep] = (time.perf_counter() - t) * 1000
            got["cpu"][k][rep] = (time.process_time() - c) * 1000
            got["thread_cpu"][k][rep] = (time.thread_time() - tc) * 1000
        print(f"  rep {rep + 1}/{reps} load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    got["kernel"], nodes = {}, {}
    for s in sess:
        ms, n = s.kernel_ms()
        nodes.update(n)
        for (k, rep), v in ms.items():
            got["kernel"].setdefault(k, [None] * reps)[rep] = v
    found["profile_nodes_per_run"] = nodes
    return got, found


def summarize(per_rep: dict) -> tuple[dict, dict, dict]:
    """({metric: {route: median ms}}, {ratio: {metric: median of per-rep ratios}}, {ratio: {metric: their
    quartiles [q1, q3]}}): the quartiles say how steady a ratio was over the reps."""
    medians = {
        m: {k: round(statistics.median(x for x in v if x is not None), 2) for k, v in routes.items()}
        for m, routes in per_rep.items()
    }
    ratios: dict = {}
    spread: dict = {}
    for name, (num, den) in RATIOS.items():
        for m, routes in per_rep.items():
            if num in routes and den in routes:
                pairs = [n / d for n, d in zip(routes[num], routes[den]) if n is not None and d is not None]
                if pairs:
                    ratios.setdefault(name, {})[m] = round(statistics.median(pairs), 4)
                if len(pairs) > 1:
                    q = statistics.quantiles(pairs, n=4)
                    spread.setdefault(name, {})[m] = [round(q[0], 4), round(q[2], 4)]
    return medians, ratios, spread


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a small model, few reps (a smoke run)")
    ap.add_argument("--steps", default="decode,prefill", help="which steps to measure (comma-separated)")
    ap.add_argument("--workdir", type=Path, help="keep the model and adapters here and reuse them")
    ap.add_argument("--prefill-reps", type=int, default=5)
    ap.add_argument("--decode-reps", type=int, default=None, help="default: 12 (--quick: 5)")
    ap.add_argument("--peft-reps", type=int, default=None, help="PyTorch reps (default: as ours; 0: none)")
    ap.add_argument(
        "--threads", type=int, default=1, help="ORT intra-op and PyTorch threads (1: thread_cpu is all the work)"
    )
    ap.add_argument("--no-profile", action="store_true", help="no ORT profiler (no kernel times)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    reps = {"prefill": args.prefill_reps, "decode": args.decode_reps or (5 if args.quick else 12)}
    torch.set_num_threads(args.threads)
    load = {"start": os.getloadavg()}
    results, found, session_info = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        base, peft, adapters, build_info = build(cfg, work)
        base_ort = ort.InferenceSession(
            str(work / "base.onnx"), options(args.threads), providers=["CPUExecutionProvider"]
        )
        steps = {"decode": (PAST, 1), "prefill": (0, PROMPT)}
        for phase in args.steps.split(","):
            past, new = steps[phase]
            peft_reps = reps[phase] if args.peft_reps is None else min(args.peft_reps, reps[phase])
            profile = None if args.no_profile else f"{tmp}/per_row_{phase}"
            sess8, sess64, session_info = sessions(work, adapters, profile, args.threads)
            load[f"{phase}_before"] = os.getloadavg()
            results[phase], found[phase] = measure(
                cfg, past, new, reps[phase], (sess8, sess64), peft, base, base_ort, adapters, peft_reps
            )
            load[f"{phase}_after"] = os.getloadavg()
            del sess8, sess64
            print(f"{phase}: {summarize(results[phase])} {found[phase]}", file=sys.stderr, flush=True)
    summary = {phase: summarize(r) for phase, r in results.items()}
    table = []
    for phase, (medians, _, _) in summary.items():
        for k in medians["wall"]:
            table.append([phase, k, *(f"{medians[m][k]:.1f}" if k in medians.get(m, {}) else "-" for m in METRICS)])
    print_table(["step", "route", *(f"{m} ms" for m in METRICS)], table)
    print()
    rows = []
    for phase, (_, ratios, spread) in summary.items():
        for name, by in ratios.items():
            q = spread.get(name, {})
            cell = {m: f"{by[m]:.3f}" + (f" [{q[m][0]:.3f}-{q[m][1]:.3f}]" if m in q else "") for m in by}
            rows.append([phase, name, *(cell.get(m, "-") for m in METRICS)])
    print_table(["step", "ratio: median of per-rep [quartiles]", *METRICS], rows)
    print("checks:", found)
    print("load average (1, 5, 15 min):", load)
    data = {
        "machine": machine_details(),
        "load_average": load,
        "config": {
            **cfg,
            "batch": BATCH,
            "prompt": PROMPT,
            "past": PAST,
            "rank": RANK,
            "targets": ["q_proj", "v_proj"],
        },
        "quick": args.quick,
        "reps": reps,
        "peft_reps": args.peft_reps,
        "threads": args.threads,
        "median_ms": {phase: s[0] for phase, s in summary.items()},
        "ratios": {phase: s[1] for phase, s in summary.items()},
        "ratio_quartiles": {phase: s[2] for phase, s in summary.items()},
        "per_rep_ms": results,
        "checks": found,
        "build": {**build_info, **session_info},
    }
    name = "per_row" + ("-quick" if args.quick else "") + ("" if args.threads == 1 else f"-{args.threads}thread")
    print("wrote", write_results(name, data))


if __name__ == "__main__":
    main()

"""Kernel time of the injected LoRA branch nodes in ONNX Runtime's profiler, per run of a genai decoder.

On a shared machine a whole decode step moves by several percent from run to run, even for the same graph;
the profiler's per-node kernel times of the branch itself (nodes named after a slot, ``…self_attn…``/
``lora``/``packed``) are far steadier. Uses the artifacts of ``genai_llama.py`` (its workdir) for feeds.

Run:  .venv/bin/python benchmarks/branch_profile.py [--phase decode|prompt] [--reps N] LABEL=MODEL[:ADAPTER] ...
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import statistics
import sys
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _genai_build as gb  # noqa: E402
import _genai_refs as refs  # noqa: E402

VOCAB = gb.CONFIG["vocab_size"]
KV = (gb.CONFIG["num_key_value_heads"], gb.CONFIG["hidden_size"] // gb.CONFIG["num_attention_heads"])
BRANCH_MARKS = ("lora", "packed", "self_attn")  # slot stems are module paths; the builder's nodes say /attn/


def _options(threads: int, profile: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, profile
    return so


def profile(path: str, adapter: str | None, phase: str, reps: int, threads: int) -> dict:
    """{"nodes": all kernel µs per run, "branch": branch kernel µs per run, "by_op": branch µs by op type (means
    over the runs), "per_run": medians over the runs of all-node µs, branch µs and branch share (a run slowed
    by another process moves a mean, not a median)}."""
    warm = ort.InferenceSession(path, _options(threads), providers=["CPUExecutionProvider"])
    sess = ort.InferenceSession(path, _options(threads, "/tmp/branch_profile"), providers=["CPUExecutionProvider"])
    ro, lora = ort.RunOptions(), None
    if adapter:
        lora = ort.LoraAdapter()  # RunOptions does not keep it alive: held here
        lora.Load(adapter)
        ro.add_active_adapter(lora)
    names = [o.name for o in sess.get_outputs()]
    inputs = [i.name for i in sess.get_inputs() if ".lora_" not in i.name]
    feeds = refs.feeds(inputs, "prompt", 1, None, VOCAB, KV)
    if phase == "decode":
        past = {n: a for n, a in zip(names, warm.run(names, feeds, ro)) if n.startswith("present.")}
        feeds = refs.feeds(inputs, "decode", 1, past, VOCAB, KV)
    for _ in range(reps):
        sess.run(names, feeds, ro)
    trace = sess.end_profiling()
    with open(trace) as fh:
        trace_events = json.load(fh)
    os.remove(trace)
    events = [e for e in trace_events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    starts = sorted(e["ts"] for e in trace_events if e.get("cat") == "Session" and e["name"] == "model_run")
    by_op: collections.Counter = collections.Counter()
    runs = collections.defaultdict(lambda: [0.0, 0.0])  # run → [all nodes µs, branch µs]
    for e in events:
        run = runs[bisect.bisect_right(starts, e["ts"])]
        run[0] += e["dur"]
        if any(m in e["name"] for m in BRANCH_MARKS):
            by_op[e["args"].get("op_name", "?")] += e["dur"] / reps
            run[1] += e["dur"]
    total = sum(e["dur"] for e in events) / reps
    per_run = {
        "nodes": statistics.median(r[0] for r in runs.values()),
        "branch": statistics.median(r[1] for r in runs.values()),
        "share": round(statistics.median(r[1] / r[0] for r in runs.values() if r[0]), 5),
    }
    out = {"nodes": round(total, 1), "branch": round(sum(by_op.values()), 1), "by_op": dict(by_op)}
    return {**out, "per_run": per_run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="LABEL=MODEL[:ADAPTER]")
    ap.add_argument("--phase", choices=["decode", "prompt"], default="decode")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for spec in args.models:
        label, rest = spec.split("=", 1)
        path, _, adapter = rest.partition(":")
        r = profile(path, adapter or None, args.phase, args.reps, args.threads)
        ops = " ".join(f"{k}:{v:.0f}" for k, v in sorted(r["by_op"].items()))
        share = 100 * r["per_run"]["share"]
        print(f"{label:10s} all nodes {r['nodes']:9.1f} µs  branch {r['branch']:7.1f} µs ({share:.2f} %)  {ops}")


if __name__ == "__main__":
    main()

"""The LoRA branch of a packed ``qkv_proj`` on an onnxruntime-genai builder model: wall time and kernel time.

The builder's ~153M LLaMA (``_genai_build``: GroupQueryAttention, packed ``qkv_proj``; fp32 MatMul and int4
MatMulNBits), the rank-8 q/v adapter, batch 1: a 128-token prompt and one decode step over its 128-token past.
Variants, all in one run on the same inputs:

  base        the builder's model
  cat+A       ``inject`` (default: one A_cat/B_cat pair per packed op, ``slots.packed_cat``), adapter active
  split+A     ``inject`` with ``packed_cat=False`` (a pair per slot, deltas joined in the graph: the form of
              models injected before), adapter active
  cat none    the cat model without adapter (rank-0 branches)
  split none  the split model without adapter
  twin        the graph ``LoraSession(base_session=True)`` runs for ``adapter=None`` (``runtime.base_path``)

Wall time: each variant's median over interleaved repetitions (order rotated per repetition) and the median of
its per-repetition ratios to base. Kernel time (ONNX Runtime's profiler, a session of its own per variant):
every node's kernel µs per run, and the branch nodes' (named after a slot: ``branch_profile``), as a share
of the whole. On a shared machine the wall-time ratios move by several percent; the branch share is the
steady figure. Adapters go in through ``RunOptions.add_active_adapter`` (what LoraSession's feeds amount to).

Run:  .venv/bin/python benchmarks/packed_branch.py [--workdir DIR] [--precisions int4,fp32] [--reps 60]
(GENAI_PY: a Python with onnxruntime-genai's builder; default this interpreter.)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "plugins"), str(HERE)]
os.environ.setdefault("GENAI_PY", sys.executable)

import _genai_build as gb  # noqa: E402
import _genai_refs as refs  # noqa: E402
from _common import machine_details, print_table, write_results  # noqa: E402
from branch_profile import _options, profile  # noqa: E402

VOCAB = gb.CONFIG["vocab_size"]
KV = (gb.CONFIG["num_key_value_heads"], gb.CONFIG["hidden_size"] // gb.CONFIG["num_attention_heads"])
VARIANTS = ["base", "cat+A", "split+A", "cat none", "split none", "twin"]


def build(work: Path, precision: str) -> dict[str, tuple[str, str | None]]:
    """variant → (model path, adapter file or None); the injected models are rebuilt every run (the code
    measured may have changed), the builder's base once."""
    import onnx_ir as ir
    from lora_export_plugins import int4

    from lora_export.graph.model.slot_manifest import SLOTS_KEY, SlotManifest
    from lora_export.graph.verbs.inject import inject_files
    from lora_export.runtime.base_path import strip_branches

    int4.register()
    gb.build_hf(work)
    base = gb.build_genai(work, precision, baked=False)
    if "error" in base:
        raise SystemExit(f"builder failed: {base['error']}")
    out = {"base": (base["path"], None)}
    weights = work / "hf" / "model.safetensors"
    for form in ("cat", "split"):
        inj = work / f"packed-{form}-{precision}"
        t = time.perf_counter()
        inject_files(
            base["path"], [work / "adapter"], inj, base_weights=weights, names=["qv"], packed_cat=form == "cat"
        )
        print(f"{precision}: inject ({form}) {time.perf_counter() - t:.1f}s", flush=True)
        out[f"{form}+A"] = (str(inj / "model.onnx"), str(inj / "qv.onnx_adapter"))
        out[f"{form} none"] = (str(inj / "model.onnx"), None)
    model = ir.load(work / f"packed-cat-{precision}" / "model.onnx")
    strip_branches(model, SlotManifest.from_json(model.metadata_props[SLOTS_KEY]))
    twin = work / f"packed-twin-{precision}"
    twin.mkdir(exist_ok=True)
    ir.save(model, twin / "model.onnx", external_data="model.onnx.data")
    out["twin"] = (str(twin / "model.onnx"), None)
    return out


def wall(models: dict, phase: str, reps: int, threads: int) -> tuple[dict, dict]:
    """(variant → {"ms": median, "overhead": median per-rep ratio to base − 1}, variant → first output)."""
    sessions, holders = {}, []
    for key, (path, adapter) in models.items():
        sess = ort.InferenceSession(path, _options(threads), providers=["CPUExecutionProvider"])
        ro = ort.RunOptions()
        if adapter:
            lora = ort.LoraAdapter()
            lora.Load(adapter)
            holders.append(lora)  # RunOptions does not keep it alive
            ro.add_active_adapter(lora)
        names = [o.name for o in sess.get_outputs()]
        inputs = [i.name for i in sess.get_inputs() if ".lora_" not in i.name]
        feeds = refs.feeds(inputs, "prompt", 1, None, VOCAB, KV)
        if phase == "decode":
            past = {n: a for n, a in zip(names, sess.run(names, feeds, ro)) if n.startswith("present.")}
            feeds = refs.feeds(inputs, "decode", 1, past, VOCAB, KV)
        sessions[key] = (sess, names, feeds, ro)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    outs = {k: s.run(names, f, ro)[0] for k, (s, names, f, ro) in sessions.items()}  # warm-up, and outputs
    keys = list(sessions)
    for rep in range(reps):
        for k in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            sess, names, feeds, ro = sessions[k]
            t = time.perf_counter()
            sess.run(names, feeds, ro)
            times[k].append(time.perf_counter() - t)
    res = {}
    for k, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["base"])]
        res[k] = {"ms": round(statistics.median(ts) * 1e3, 3), "overhead": round(statistics.median(ratios) - 1, 4)}
    del sessions
    gc.collect()
    return res, outs


def kernels(models: dict, phase: str, reps: int, threads: int) -> dict:
    """variant → the profiler's all-node and branch-node kernel µs per run (``branch_profile.profile``)."""
    out = {}
    for key, (path, adapter) in models.items():
        r = profile(path, adapter, phase, reps, threads)
        share = r["per_run"]["share"]
        # What the branch adds to the step it runs in, by kernel time: branch / (all nodes − branch).
        r["branch_overhead"] = round(share / (1 - share), 5)
        out[key] = r
        gc.collect()
    base = out["base"]["per_run"]["nodes"]
    for r in out.values():
        r["kernel_overhead"] = round(r["per_run"]["nodes"] / base - 1, 4) if base else None
    return out


def exactness(outs: dict) -> dict:
    """Output checks in the same run: rank-0 and twin against base bit for bit; cat against split."""
    base, cat, split = outs["base"], outs["cat+A"], outs["split+A"]
    return {
        "cat_none_equals_base": bool(np.array_equal(outs["cat none"], base)),
        "split_none_equals_base": bool(np.array_equal(outs["split none"], base)),
        "twin_equals_base": bool(np.array_equal(outs["twin"], base)),
        "cat_vs_split_rel": float(np.abs(cat - split).max() / np.abs(split).max()),
        "adapter_changes_output_rel": float(np.abs(cat - base).max() / np.abs(base).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lora-export-genai-bench")
    ap.add_argument("--precisions", default="int4,fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=60, help="wall-time repetitions of a decode step (prompt: ÷6)")
    ap.add_argument("--profile-reps", type=int, default=150, help="profiled decode steps per variant (prompt: ÷15)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data: dict = {
        "benchmark": "packed_branch",
        "machine": machine_details(),
        "load_average_start": list(os.getloadavg()),
        "git": subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "model": {**gb.CONFIG, "adapter": {"r": gb.RANK, "alpha": gb.ALPHA, "targets": gb.TARGETS}},
        "threads": args.threads,
        "results": {},
    }
    for p in args.precisions.split(","):
        models = build(args.workdir, p)
        data["results"][p] = {}
        for phase, reps, preps in (
            ("decode", args.reps, args.profile_reps),
            ("prompt", max(3, args.reps // 6), max(3, args.profile_reps // 15)),
        ):
            t = time.perf_counter()
            w, outs = wall(models, phase, reps, args.threads)
            k = kernels(models, phase, preps, args.threads)
            data["results"][p][phase] = {"wall": w, "kernels": k, "exact": exactness(outs), "reps": [reps, preps]}
            print(f"{p} {phase}: {time.perf_counter() - t:.0f}s, load {os.getloadavg()[0]:.1f}", flush=True)
    data["load_average_end"] = list(os.getloadavg())
    report(data)
    path = write_results("packed_branch", data) if args.out is None else args.out
    if args.out is not None:
        import json

        args.out.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")


def report(data: dict) -> None:
    """One row per (precision, phase, variant): wall ms and its median per-rep ratio to base; the profiler's
    per-run medians of branch and all-node kernel µs, branch / (all − branch), and all-node µs vs base."""
    rows = []
    for p, phases in data["results"].items():
        for phase, r in phases.items():
            for v in VARIANTS:
                w, k = r["wall"][v], r["kernels"][v]
                cells = [f"{w['ms']:.2f}", f"{100 * w['overhead']:+.1f} %", f"{k['per_run']['branch']:.0f}"]
                cells += [f"{k['per_run']['nodes']:.0f}", f"+{100 * k['branch_overhead']:.2f} %"]
                rows.append([p, phase, v, *cells, f"{100 * k['kernel_overhead']:+.1f} %"])
    headers = ["precision", "phase", "variant", "wall ms", "wall vs base", "branch µs", "all µs", "branch/rest"]
    print_table([*headers, "all vs base"], rows)


if __name__ == "__main__":
    main()

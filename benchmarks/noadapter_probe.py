"""Probe: is ``adapter=None`` slower than the base model, and what does a branch-free twin session cost?

Interleaved (ABAB…) runs of the plain base model vs the injected model with no adapter bound (rank-0
branches) vs a branch-free twin session over the same initializer memory, with and without CPU prepacking;
medians of per-round ratios. Memory: each configuration's RSS growth, measured in a fresh process.

Run: .venv/bin/python benchmarks/noadapter_probe.py [--quick] [--rounds N] [--dir DIR]
(the model is exported once into DIR and reused.)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from adapters import FULL, QUICK, SEQ, build_base, make_adapter  # noqa: E402

from lora_export import LoraSession, inject_files  # noqa: E402


def options(threads: int = 2) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def build(cfg: dict, d: Path) -> None:
    if (d / "injected" / "model.onnx").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    base, _ = build_base(cfg, d / "base.onnx")
    inject_files(base, [make_adapter(cfg, 1, d / "adapter_one")], d / "injected")


def rss_mib() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def make(config: str, d: Path):
    """A callable running ``config`` on feeds (and the objects it keeps alive)."""
    model = d / "injected" / "model.onnx"
    if config == "base":
        s = ort.InferenceSession(str(d / "base.onnx"), options(), providers=["CPUExecutionProvider"])
        return lambda f: s.run(None, f)
    if config == "injected_none":
        s = LoraSession(model, providers=["CPUExecutionProvider"], sess_options=options(), base_session=False)
        return lambda f: s.run(None, f)
    if config == "all_noprepack":
        so = options()
        so.add_session_config_entry("session.disable_prepacking", "1")
        s = LoraSession(model, providers=["CPUExecutionProvider"], sess_options=so, base_session=True)
        return lambda f: s.run(None, f)
    if config.startswith("twin"):
        prepack = config != "twin_noprepack"
        s = LoraSession(
            model,
            providers=["CPUExecutionProvider"],
            sess_options=options(),
            base_session=True,
            base_prepacking=prepack,
        )
        return lambda f: s.run(None, f)
    raise SystemExit(f"unknown config {config}")


def child_memory(config: str, d: Path, cfg: dict) -> None:
    before = rss_mib()
    fn = make(config, d)
    ids = np.random.default_rng(0).integers(0, cfg["vocab"], (1, SEQ), dtype=np.int64)
    fn({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    print(json.dumps({"config": config, "rss_growth_mib": round(rss_mib() - before, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lora-probe"))
    ap.add_argument("--configs", default="base,injected_none,twin,twin_noprepack,all_noprepack")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    build(cfg, args.dir)
    if args.memory_child:
        child_memory(args.memory_child, args.dir, cfg)
        return
    configs = args.configs.split(",")
    memory = {}
    for c in configs:
        cmd = [sys.executable, __file__, "--dir", str(args.dir), "--memory-child", c] + (
            ["--quick"] if args.quick else []
        )
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        memory[c] = json.loads(out)["rss_growth_mib"]
    print("RSS growth (MiB):", memory, flush=True)

    fns = {c: make(c, args.dir) for c in configs}
    ids = np.random.default_rng(1).integers(0, cfg["vocab"], (args.batch, SEQ), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref = fns["base"](feeds)[0]
    for c, fn in fns.items():
        out = fn(feeds)[0]
        print(f"{c}: max |diff| vs base = {float(np.abs(out - ref).max()):.3g}")
        fn(feeds)
    samples = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for c in order:
            t = time.perf_counter()
            fns[c](feeds)
            samples[c].append(time.perf_counter() - t)
    result = {"batch": args.batch, "rounds": args.rounds, "rss_growth_mib": memory, "median_ms": {}, "vs_base": {}}
    for c in configs:
        result["median_ms"][c] = round(statistics.median(samples[c]) * 1000, 2)
        ratios = [x / y for x, y in zip(samples[c], samples["base"])]
        q = statistics.quantiles(ratios, n=4)
        result["vs_base"][c] = {
            "median": round(statistics.median(ratios), 4),
            "q1": round(q[0], 4),
            "q3": round(q[2], 4),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark ``merge`` and ``inject`` on a 162M-parameter LLaMA-architecture model (random init, fp32,
650 MB of external data; a PEFT adapter of rank 16 on q_proj and v_proj).

Compares, each in its own process (peak RSS: that process alone, from wait4), runs interleaved:
  cp          ``cp base.onnx base.onnx.data OUT/`` (the I/O floor)
  merge CLI   ``lora-export merge base.onnx adapter -o OUT/merged.onnx`` (wall time, start-up included)
  inject CLI  ``lora-export inject base.onnx adapter -o OUT/``
  merge API   merge_file(...) timed inside its process (no start-up)
  usual       load PyTorch weights (safetensors) → PEFT load adapter → merge_and_unload → torch.onnx.export
The CLI runs also report whether torch was imported (the goal: never).

Usage: python benchmarks/merge.py [--workdir DIR] [--runs 3] [--usual-runs 1] [--baseline CHECKOUT]
(--workdir keeps the built model for the next run; --baseline times another checkout's CLI beside ours)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CLI_PROBE,
    cli_command,
    export_logits,
    llama_with_external_data,
    machine_details,
    print_table,
    run_child,
    timed_process,
    tree_path,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
# 162.4M parameters, 650 MB in fp32.
CONFIG = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
RANK = 16
TARGETS = ["q_proj", "v_proj"]


def _peak_mb() -> float:
    # VmHWM belongs to this exec'd image; ru_maxrss would carry over the (large) parent's RSS at fork.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def setup(work: Path) -> dict:
    """Base weights (safetensors), random nonzero r=16 adapter, and the base ONNX with external data."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, params = llama_with_external_data(work, CONFIG, export_logits)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft_model.save_pretrained(work / "adapter")
    info = {"parameters": params, "base_bytes": sum(f.stat().st_size for f in work.glob("base.onnx*"))}
    (work / "setup.json").write_text(json.dumps({"config": CONFIG, **info}))
    return info


def child(variant: str, work: Path, out: Path) -> dict:
    """One timed run of ``variant`` in this process."""
    out.mkdir(parents=True, exist_ok=True)
    if variant == "ours":
        from lora_export import merge_file

        t = time.perf_counter()
        report = merge_file(work / "base.onnx", work / "adapter", out / "merged.onnx")
        return {"seconds": time.perf_counter() - t, "merged": len(report.merged)}
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    t = time.perf_counter()
    base = LlamaForCausalLM.from_pretrained(work / "torch_base", torch_dtype=torch.float32).eval()
    merged = PeftModel.from_pretrained(base, work / "adapter").merge_and_unload()
    export_logits(merged, out / "merged.onnx")
    return {"seconds": time.perf_counter() - t}


def _reuse(work: Path) -> dict | None:
    try:
        saved = json.loads((work / "setup.json").read_text())
    except (OSError, ValueError):
        return None
    ready = all((work / p).exists() for p in ("base.onnx", "base.onnx.data", "adapter", "torch_base"))
    return saved if ready and saved.pop("config") == CONFIG else None


def _env(tree: Path, first: list[str] | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": tree_path(tree, first or [])}


def _cli_runs(work: Path, probe: Path, trees: dict[str, Path]) -> dict[str, list[str]]:
    """variant → the command line one run executes (its output folder is OUT, replaced per run)."""
    plan = {"cp": ["cp", str(work / "base.onnx"), str(work / "base.onnx.data"), "OUT/"]}
    for label in trees:
        suffix = "" if label == "this" else f"@{label}"
        plan[f"merge CLI{suffix}"] = cli_command(probe, "merge", str(work / "base.onnx"), str(work / "adapter"), "-o")
        plan[f"merge CLI{suffix}"] += ["OUT/merged.onnx"]
        plan[f"inject CLI{suffix}"] = cli_command(
            probe, "inject", str(work / "base.onnx"), str(work / "adapter"), "-o", "OUT"
        )
    return plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--usual-runs", type=int, default=1)
    ap.add_argument("--baseline", type=Path, help="another checkout whose CLI to time beside this one")
    ap.add_argument(
        "--this-path", action="append", default=[], help="a folder put first on PYTHONPATH for this checkout only"
    )
    ap.add_argument("--child", choices=["ours", "usual"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        result = child(args.child, args.workdir, args.out)
        result["peak_rss_mb"] = _peak_mb()
        print(json.dumps(result))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lora-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    info = _reuse(work)
    if info is None:
        info = setup(work)
    print(
        f"model: {info['parameters'] / 1e6:.1f}M parameters, {info['base_bytes'] / 1e6:.0f} MB "
        f"(setup {time.perf_counter() - t:.0f}s)",
        flush=True,
    )
    me = Path(__file__).resolve()
    probe = work / "cli_probe.py"
    probe.write_text(CLI_PROBE)
    trees = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    plan = _cli_runs(work, probe, trees)
    runs: dict[str, list[dict]] = {v: [] for v in [*plan, "merge API", "usual"]}
    out = work / "out"

    def fresh() -> Path:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return out

    subprocess_env = {
        v: _env(trees["baseline"]) if v.endswith("@baseline") else _env(REPO, args.this_path) for v in plan
    }
    timed_process(["cp", str(work / "base.onnx.data"), str(fresh())])  # the page cache
    for i in range(args.runs):
        for variant, cmd in plan.items():
            o = fresh()
            r = timed_process(
                [c.replace("OUT", str(o)) if c.startswith("OUT") else c for c in cmd], subprocess_env[variant]
            )
            if r["exit"] != 0:
                raise RuntimeError(f"{variant} failed: {r.get('stderr', '')}")
            runs[variant].append(r)
            print(
                f"{variant} run {i + 1}/{args.runs}: {r['seconds']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        r = run_child(me, "--child", "ours", "--workdir", str(work), "--out", str(fresh()))
        runs["merge API"].append(r)
        print(f"merge API run {i + 1}/{args.runs}: {r['seconds']:.2f}s in-process", flush=True)
    for i in range(args.usual_runs):
        r = run_child(me, "--child", "usual", "--workdir", str(work), "--out", str(fresh()))
        runs["usual"].append(r)
        print(
            f"usual run {i + 1}/{args.usual_runs}: {r['seconds']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True
        )
    shutil.rmtree(out, ignore_errors=True)

    med = {v: statistics.median(r["seconds"] for r in rs) for v, rs in runs.items() if rs}
    rss = {v: max(r["peak_rss_mb"] for r in rs) for v, rs in runs.items() if rs}
    model_mb = info["base_bytes"] / 2**20
    torch = {v: any(r.get("torch") == "True" for r in rs) for v, rs in runs.items() if v in plan and v != "cp"}
    rows = [
        [v, len(runs[v]), f"{med[v]:.2f}", f"{med[v] / med['cp']:.2f}x", f"{rss[v]:.0f}", f"{rss[v] / model_mb:.2f}"]
        + [str(torch.get(v, "-"))]
        for v in med
    ]
    print()
    print_table(["variant", "runs", "median s", "vs cp", "peak RSS MB", "RSS / model", "torch loaded"], rows)
    ratios = {
        "merge_cli_vs_cp": med["merge CLI"] / med["cp"],
        "inject_cli_vs_cp": med["inject CLI"] / med["cp"],
        "merge_rss_vs_model": rss["merge CLI"] / model_mb,
        "inject_rss_vs_model": rss["inject CLI"] / model_mb,
    }
    if "usual" in med:
        ratios["usual_vs_merge_cli"] = med["usual"] / med["merge CLI"]
    print(
        f"\nmerge CLI is {ratios['merge_cli_vs_cp']:.2f}x cp (goal <= 2x, stretch 1.2x), inject CLI "
        f"{ratios['inject_cli_vs_cp']:.2f}x; peak RSS {ratios['merge_rss_vs_model']:.2f}x the model (goal <= 0.25)"
        + (f"; the usual route is {ratios['usual_vs_merge_cli']:.1f}x slower (goal >= 10x)" if "usual" in med else "")
    )
    data = {
        "benchmark": "merge",
        "machine": machine_details(),
        "model": {"architecture": "LlamaForCausalLM", **CONFIG, **info, "dtype": "float32"},
        "adapter": {"rank": RANK, "targets": TARGETS},
        "trees": {k: str(v) for k, v in trees.items()},
        "this_first_on_path": args.this_path,
        "runs": runs,
        "median_seconds": med,
        "peak_rss_mb": rss,
        "torch_loaded": torch,
        "ratios": ratios,
        "goals": {"cli_vs_cp_max": 2.0, "cli_vs_cp_stretch": 1.2, "rss_vs_model_max": 0.25, "usual_vs_merge_min": 10},
        "notes": "each run in its own process, interleaved; CLI and cp times are wall time with process start; "
        "peak RSS from wait4 (that process alone); files in the page cache (one warm-up copy first)",
    }
    print(f"wrote {write_results('merge', data)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark ``merge`` on a ≥150M-parameter LLaMA-architecture model (random init, fp32, external data).

Compares, each in its own subprocess (peak RSS = that process's ru_maxrss):
  ours   merge_file(base.onnx, adapter, out.onnx)
  copy   shutil.copy of base.onnx + base.onnx.data (the I/O floor)
  usual  load PyTorch weights (safetensors) → PEFT load adapter → merge_and_unload → torch.onnx.export

Usage: python benchmarks/merge.py [--workdir DIR] [--runs 3] [--usual-runs 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_details, print_table, run_child, write_results  # noqa: E402

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


def _export(model, path: Path) -> None:
    import torch

    class Logits(torch.nn.Module):
        # Explicit attention mask: without one, transformers' mask code uses ops TorchScript cannot export.
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, CONFIG["vocab_size"], (1, 16))
    mask = torch.ones_like(ids)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model), (ids, mask), str(path), input_names=["input_ids", "attention_mask"], dynamo=False
        )


def setup(work: Path) -> dict:
    """Base weights (safetensors), random nonzero r=16 adapter, and the base ONNX with external data."""
    import onnx
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="eager")).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "torch_base", safe_serialization=True)
    # onnx appends to an existing data file: a reused --workdir would grow it with dead bytes on every run.
    (work / "base.onnx.data").unlink(missing_ok=True)
    _export(model, work / "base.onnx")
    proto = onnx.load(str(work / "base.onnx"))
    onnx.save(proto, str(work / "base.onnx"), save_as_external_data=True, location="base.onnx.data", size_threshold=0)
    del proto
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft_model.save_pretrained(work / "adapter")
    return {"parameters": params, "base_bytes": sum(f.stat().st_size for f in work.glob("base.onnx*"))}


def child(variant: str, work: Path, out: Path) -> dict:
    """One timed run of ``variant`` in this process."""
    out.mkdir(parents=True, exist_ok=True)
    if variant == "copy":
        t = time.perf_counter()
        for f in ("base.onnx", "base.onnx.data"):
            shutil.copy(work / f, out / f)
        return {"seconds": time.perf_counter() - t}
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
    _export(merged, out / "merged.onnx")
    return {"seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--usual-runs", type=int, default=1)
    ap.add_argument("--child", choices=["ours", "copy", "usual"])
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
    info = setup(work)
    print(
        f"setup: {info['parameters'] / 1e6:.1f}M parameters, {info['base_bytes'] / 1e6:.0f} MB, "
        f"{time.perf_counter() - t:.0f}s",
        flush=True,
    )
    me = Path(__file__).resolve()
    runs: dict[str, list[dict]] = {"copy": [], "ours": [], "usual": []}
    run_child(me, "--child", "copy", "--workdir", str(work), "--out", str(work / "warm"))  # page cache
    shutil.rmtree(work / "warm")
    plan = [("copy", args.runs), ("ours", args.runs), ("usual", args.usual_runs)]
    for variant, n in plan:
        for i in range(n):
            out = work / f"out-{variant}-{i}"
            r = run_child(me, "--child", variant, "--workdir", str(work), "--out", str(out))
            runs[variant].append(r)
            print(f"{variant} run {i + 1}/{n}: {r['seconds']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            shutil.rmtree(out)

    med = {v: statistics.median(r["seconds"] for r in rs) for v, rs in runs.items() if rs}
    rss = {v: max(r["peak_rss_mb"] for r in rs) for v, rs in runs.items() if rs}
    rows = [[v, len(runs[v]), f"{med[v]:.2f}", f"{med[v] / med['copy']:.2f}x", f"{rss[v]:.0f}"] for v in med]
    print()
    print_table(["variant", "runs", "median s", "vs copy", "peak RSS MB"], rows)
    ratios = {"ours_vs_copy": med["ours"] / med["copy"]}
    if "usual" in med:
        ratios["usual_vs_ours"] = med["usual"] / med["ours"]
        print(
            f"\nmerge is {ratios['ours_vs_copy']:.2f}x copy time (goal <= 2x) and "
            f"{ratios['usual_vs_ours']:.1f}x faster than the usual route (goal >= 5x)"
        )
    data = {
        "benchmark": "merge",
        "machine": machine_details(),
        "model": {"architecture": "LlamaForCausalLM", **CONFIG, **info, "dtype": "float32"},
        "adapter": {"rank": RANK, "targets": TARGETS},
        "runs": runs,
        "median_seconds": med,
        "peak_rss_mb": rss,
        "ratios": ratios,
        "goals": {"ours_vs_copy_max": 2.0, "usual_vs_ours_min": 5.0},
        "notes": "each variant in its own subprocess; peak RSS includes interpreter and imports; "
        "files in page cache (one warm-up copy first)",
    }
    print(f"wrote {write_results('merge', data)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

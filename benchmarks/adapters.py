"""Adapter mode vs merged models on a ≥150M-parameter LLaMA-architecture model (random init, fp32).

Measures, at sequence 128, batch 1 and 8, r=16 on q_proj/v_proj:
  (a) switching between two loaded adapters vs creating a new merged-model session   (goal ≥1000×)
  (b) adapter mode with an adapter active vs the merged model                         (goal ≤10% slower)
  (c) adapter mode with no adapter active vs the plain base model                     (goal ≤2% slower)
      both ways LoraSession can serve adapter=None: the rank-0 branches (the default) and the
      branch-free twin session (base_session=True, shared initializers; see lora_export/session.py)
  (d) ONNX Runtime's native path (LoraAdapter + RunOptions.add_active_adapter), for comparison
Latencies are medians over interleaved repetitions (each rep runs every variant once, so drift hits all
alike). Results: a table on stdout and JSON with machine details in benchmarks/results/adapters-<host>-<date>.json.

Run: .venv/bin/python benchmarks/adapters.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from _common import machine_details, write_results  # noqa: E402

from lora_export import LoraSession, inject_files, merge_file  # noqa: E402
from lora_export.core.adapter import Adapter, LoraTarget  # noqa: E402
from lora_export.core.config import LoraConfig  # noqa: E402
from lora_export.formats.peft import save_adapter_files  # noqa: E402

FULL = dict(hidden=1024, layers=12, heads=16, intermediate=2816, vocab=32000)
QUICK = dict(hidden=256, layers=2, heads=4, intermediate=704, vocab=4000)
SEQ = 128
RANK = 16
PAIRS = {
    "adapter_vs_merged": ("adapter_mode", "merged"),
    "none_vs_base": ("adapter_mode_none", "base"),
    "none_base_session_vs_base": ("adapter_mode_none_base_session", "base"),
    "native_vs_merged": ("native_add_active_adapter", "merged"),
    "adapter_vs_native": ("adapter_mode", "native_add_active_adapter"),
}


def build_base(cfg: dict, out: Path, next_token: bool = False) -> tuple[Path, int]:
    """Export a random-init LlamaForCausalLM (input_ids → logits) with the TorchScript exporter;
    ``next_token``: only the last position's logits, as a generation server returns."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=2 * SEQ,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    params = sum(p.numel() for p in model.parameters())

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, input_ids, attention_mask):
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return logits[:, -1, :] if next_token else logits

    ids = torch.randint(0, cfg["vocab"], (1, SEQ))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model),
            (ids, torch.ones_like(ids)),
            str(out),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
            dynamo=False,
            opset_version=17,
        )
    return out, params


def make_adapter(cfg: dict, seed: int, directory: Path) -> Path:
    rng = np.random.default_rng(seed)
    h = cfg["hidden"]
    targets = {}
    for layer in range(cfg["layers"]):
        for proj in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}"
            a = (rng.standard_normal((RANK, h)) * 0.02).astype(np.float32)
            b = (rng.standard_normal((h, RANK)) * 0.02).astype(np.float32)
            targets[name] = LoraTarget(name=name, kind="linear", A=a, B=b, scale=2.0)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "v_proj"])
    save_adapter_files(Adapter(targets=targets, config=config, name=directory.name), directory)
    return directory


def options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Idle intra-op threads spin after each run; with several sessions on 2 cores, the previous session's
    # spinning threads would slow whichever session runs next. No spinning keeps the variants independent.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    ap.add_argument("--reps", type=int, default=15, help="repetitions at batch 1 (batch 8 uses about half)")
    ap.add_argument("--out", type=Path, help="JSON path (default: results/adapters-<host>-<date>.json)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        base, params = build_base(cfg, tmp / "base.onnx")
        export_s = time.perf_counter() - t
        a1 = make_adapter(cfg, 1, tmp / "adapter_one")
        a2 = make_adapter(cfg, 2, tmp / "adapter_two")
        t = time.perf_counter()
        inject_files(base, [a1, a2], tmp / "injected")
        inject_s = time.perf_counter() - t
        t = time.perf_counter()
        merge_file(base, a1, tmp / "merged.onnx")
        merge_s = time.perf_counter() - t
        model = tmp / "injected" / "model.onnx"

        # (a) switching: a new merged-model session vs the per-call work of picking another loaded adapter.
        create_s = [timed(lambda: session(tmp / "merged.onnx")) for _ in range(3)]
        lora = LoraSession(model, providers=["CPUExecutionProvider"], sess_options=options())
        load_s = [timed(lambda: lora.load_adapter("one", tmp / "injected" / "adapter_one.onnx_adapter"))]
        lora.load_adapter("two", tmp / "injected" / "adapter_two.onnx_adapter")

        def switch(name: str) -> None:
            binding = lora.session.io_binding()
            for k, v in lora._adapters[name].items():
                binding.bind_ortvalue_input(k, v)

        switch_s = []
        for i in range(2000):
            switch_s.append(timed(lambda i=i: switch("one" if i % 2 else "two")))

        sessions = {"base": session(base), "merged": session(tmp / "merged.onnx")}
        twin = LoraSession(model, providers=["CPUExecutionProvider"], sess_options=options(), base_session=True)
        native = ort.LoraAdapter()
        native.Load(str(tmp / "injected" / "adapter_one.onnx_adapter"))
        ro = ort.RunOptions()
        ro.add_active_adapter(native)
        rng = np.random.default_rng(0)
        latency: dict[str, dict[str, float]] = {}
        paired: dict[str, dict[str, float]] = {}
        check: dict[str, float] = {}
        for batch, reps in ((1, args.reps), (8, max(3, args.reps // 3))):
            ids = rng.integers(0, cfg["vocab"], (batch, SEQ), dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            variants = {
                "base": lambda f=feeds: sessions["base"].run(None, f),
                "merged": lambda f=feeds: sessions["merged"].run(None, f),
                "adapter_mode": lambda f=feeds: lora.run(None, f, adapter="one"),
                "adapter_mode_none": lambda f=feeds: lora.run(None, f),
                "adapter_mode_none_base_session": lambda f=feeds: twin.run(None, f),
                "native_add_active_adapter": lambda f=feeds: lora.session.run(None, f, ro),
            }
            if batch == 1:
                merged_out = variants["merged"]()[0]
                check["adapter_vs_merged_rel"] = float(
                    np.abs(variants["adapter_mode"]()[0] - merged_out).max() / np.abs(merged_out).max()
                )
                base_out = variants["base"]()[0]
                check["none_vs_base_rel"] = float(
                    np.abs(variants["adapter_mode_none"]()[0] - base_out).max() / np.abs(base_out).max()
                )
                check["none_base_session_vs_base_rel"] = float(
                    np.abs(variants["adapter_mode_none_base_session"]()[0] - base_out).max() / np.abs(base_out).max()
                )
            for fn in variants.values():  # warm-up
                fn()
            samples: dict[str, list[float]] = {k: [] for k in variants}
            order = list(variants)
            for rep in range(reps):
                # Rotate the order each rep: no variant always runs first (cold caches) or last.
                for k in order[rep % len(order) :] + order[: rep % len(order)]:
                    samples[k].append(timed(variants[k]))
            latency[f"batch{batch}"] = {k: median_ms(v) for k, v in samples.items()}
            latency[f"batch{batch}"]["reps"] = reps
            # Ratios within each rep, then the median: robust to the machine drifting between reps.
            paired[f"batch{batch}"] = {
                name: round(statistics.median(x / y for x, y in zip(samples[num], samples[den])), 4)
                for name, (num, den) in PAIRS.items()
            }

    switch_ms = median_ms(switch_s)
    create_ms = median_ms(create_s)
    results = {
        "benchmark": "adapters",
        "machine": machine_details(),
        "model": {
            **cfg,
            "parameters": params,
            "dtype": "float32",
            "seq": SEQ,
            "rank": RANK,
            "targets": "q_proj,v_proj",
        },
        "setup_s": {
            "export": round(export_s, 2),
            "inject_two_adapters": round(inject_s, 2),
            "merge": round(merge_s, 2),
        },
        "switch": {
            "adapter_switch_ms": switch_ms,
            "new_merged_session_ms": create_ms,
            "speedup": round(create_ms / switch_ms, 1),
            "load_adapter_once_ms": median_ms(load_s),
            "goal": ">= 1000x",
        },
        "latency_ms": latency,
        "ratios": {},
        "correctness": check,
        "total_s": round(time.perf_counter() - started, 1),
    }
    results["ratios"] = paired
    if args.out is None:
        out = write_results("adapters", results)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        out = args.out
    print(table(results))
    print(f"\nwrote {out}")


def table(r: dict) -> str:
    s = r["switch"]
    lines = [
        f"model: LLaMA {r['model']['parameters'] / 1e6:.0f}M params fp32, seq {SEQ}, r={RANK} q_proj/v_proj; "
        f"{r['machine']['cpu']} ({r['machine']['cores']} cores)",
        "",
        f"(a) switch adapters {s['adapter_switch_ms']:.4f} ms vs new merged session {s['new_merged_session_ms']:.0f} ms"
        f" -> {s['speedup']:.0f}x (goal >= 1000x); load_adapter once: {s['load_adapter_once_ms']:.1f} ms",
        "",
        f"{'variant':32s}" + "".join(f"{b:>14s}" for b in r["latency_ms"]),
    ]
    variants = [
        "base",
        "merged",
        "adapter_mode",
        "adapter_mode_none",
        "adapter_mode_none_base_session",
        "native_add_active_adapter",
    ]
    for v in variants:
        lines.append(f"{v:32s}" + "".join(f"{r['latency_ms'][b][v]:>11.1f} ms" for b in r["latency_ms"]))
    lines.append("")
    for b, ratio in r["ratios"].items():
        lines.append(
            f"{b}: (b) adapter/merged {ratio['adapter_vs_merged']:.3f} (goal <= 1.10)   "
            f"(c) none/base {ratio['none_vs_base']:.3f} (goal <= 1.02; base_session "
            f"{ratio['none_base_session_vs_base']:.3f})   "
            f"(d) native/merged {ratio['native_vs_merged']:.3f}  (median of per-rep ratios)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

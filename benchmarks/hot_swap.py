"""Benchmark ``MergedSession``'s in-place adapter switch on a 162M LLaMA (fp32, external data, r=16 q/v adapters).

Measures, on one machine in one run:
  switch    MergedSession.switch(a1 | a2), alternating (24 q/v weights recomputed from pristine W₀ and written)
  reload    a new InferenceSession over merge's file (what a switch replaces), and merge_file + that session
  run       after switch(a1) vs a plain session over merge's file for a1 (interleaved rounds, seq 64); a plain
            session with prepacking disabled too: what giving up ORT's weight prepacking would cost everywhere
  drift     N switches cycling a1 → a2 → None, then a1's weights and outputs bit-compared with the first ones
  memory    RSS (anonymous and file-backed) of a process holding a plain session vs one holding a MergedSession
            with both adapters, each after one run (separate subprocesses)
  peft      PEFT's unmerge → set_adapter → merge swap in PyTorch (time, and its drift after the same cycles)

BLAS runs single-threaded here (``--blas-threads``, default 1, set before numpy loads): the rank-16 products are
too small to split, and on a busy 2-core VM OpenBLAS's spinning threads made one 768×16·16×768 product take
~26 ms instead of 0.25 ms. A server should do the same (``OPENBLAS_NUM_THREADS=1``).

Usage: python benchmarks/hot_swap.py [--workdir DIR] [--switches 10000] [--rounds 20] [--blas-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __name__ == "__main__":  # before numpy loads: OpenBLAS reads it once
    _n = sys.argv[sys.argv.index("--blas-threads") + 1] if "--blas-threads" in sys.argv else "1"
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = _n

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import llama_with_external_data, machine_details, print_table, run_child, write_results  # noqa: E402

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
SEQ = 64


def _export(model, path: Path) -> None:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, CONFIG["vocab_size"], (1, 16))
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model),
            (ids, torch.ones_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=dyn,
            dynamo=False,
        )


def setup(work: Path) -> dict:
    """The base (torch weights and ONNX with external data), two random r=16 q/v adapters, merge's file for a1."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_export import merge_file

    model, params = llama_with_external_data(work, CONFIG, _export)
    for seed, name in ((1, "a1"), (2, "a2")):
        peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, target_modules=TARGETS))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        peft_model.save_pretrained(work / name)
        model = peft_model.unload()
    t = time.perf_counter()
    merge_file(work / "base.onnx", work / "a1", work / "merged_a1.onnx")
    return {
        "parameters": params,
        "base_bytes": sum(f.stat().st_size for f in work.glob("base.onnx*")),
        "merge_file_s": time.perf_counter() - t,
    }


def _feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG["vocab_size"], (1, SEQ)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _plain(path: Path, prepacking: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _rss() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def child(variant: str, work: Path) -> dict:
    """Memory of one serving process, after creating it and one run (both import the same modules first)."""
    import onnxruntime  # noqa: F401

    import lora_export  # noqa: F401

    feeds = _feeds(7)
    before = _rss()
    if variant == "plain":
        sess = _plain(work / "merged_a1.onnx")
        sess.run(None, feeds)
    else:
        from lora_export import MergedSession

        sess = MergedSession(
            work / "base.onnx", ["CPUExecutionProvider"], adapters={"a1": work / "a1", "a2": work / "a2"}
        )
        sess.switch("a1")
        sess.run(None, feeds)
    return {"before": before, "after": _rss()}


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def measure(work: Path, switches: int, rounds: int) -> dict:
    from lora_export import MergedSession, merge_file

    feeds = _feeds(7)
    out: dict = {}
    # reload: a new session over merge's file (page cache warm after the first).
    reload = []
    for _ in range(5):
        t = time.perf_counter()
        _plain(work / "merged_a1.onnx")
        reload.append(time.perf_counter() - t)
    out["reload_ms"] = _median_ms(reload)
    t = time.perf_counter()
    merge_file(work / "base.onnx", work / "a2", work / "merged_a2.onnx", force=True)
    _plain(work / "merged_a2.onnx")
    out["merge_and_reload_ms"] = (time.perf_counter() - t) * 1000

    # The CLI route, interpreter start included: lora-export merge for a2 (then a session must still be opened).
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lora_export", "merge", str(work / "base.onnx"), str(work / "a2"), "-o",
         str(work / "merged_a2_cli.onnx")],
        check=True, capture_output=True,
    )  # fmt: skip
    out["merge_cli_wall_ms"] = (time.perf_counter() - t) * 1000

    t = time.perf_counter()
    sess = MergedSession(work / "base.onnx", ["CPUExecutionProvider"], adapters={"a1": work / "a1", "a2": work / "a2"})
    out["open_merged_session_ms"] = (time.perf_counter() - t) * 1000
    out["targeted_initializers"] = len(sess.targeted_initializers)
    times, compute, write = [], [], []
    for i in range(60):
        rep = sess.switch("a1" if i % 2 else "a2")
        times.append(rep["timings"]["total"])
        compute.append(rep["timings"]["compute"])
        write.append(rep["timings"]["write"])
    out["switch_ms"] = _median_ms(times)
    out["switch_compute_ms"] = _median_ms(compute)
    out["switch_write_ms"] = _median_ms(write)

    # run time: interleaved rounds, each session warmed first.
    sess.switch("a1")
    plain, noprepack = _plain(work / "merged_a1.onnx"), _plain(work / "merged_a1.onnx", prepacking=False)
    ref = plain.run(None, feeds)[0]
    first = sess.run(None, feeds)[0]
    out["max_abs_diff_vs_merged_file"] = float(np.abs(first - ref).max())
    out["max_rel_diff_vs_merged_file"] = float(np.abs(first - ref).max() / np.abs(ref).max())
    import onnx
    from onnx import numpy_helper

    merged = {t.name: t for t in onnx.load(str(work / "merged_a1.onnx")).graph.initializer}
    out["weights_bit_identical_to_merged_file"] = all(
        sess.weight(n).tobytes() == numpy_helper.to_array(merged[n], base_dir=str(work)).tobytes()
        for n in sess.targeted_initializers
    )
    out["bit_identical_to_merged_file"] = bool(np.array_equal(first, ref))
    runs = {"merged_session": [], "plain_merged_file": [], "plain_no_prepacking": []}
    fns = {
        "merged_session": lambda: sess.run(None, feeds),
        "plain_merged_file": lambda: plain.run(None, feeds),
        "plain_no_prepacking": lambda: noprepack.run(None, feeds),
    }
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            runs[k].append(time.perf_counter() - t)
    out["run_ms"] = {k: _median_ms(v) for k, v in runs.items()}

    # drift
    weights = {n: sess.weight(n) for n in sess.targeted_initializers}
    t = time.perf_counter()
    order = ["a2", None, "a1"]
    for i in range(switches):
        sess.switch(order[i % 3])
    sess.switch("a1")
    out["drift_switches"] = switches + 1
    out["drift_seconds"] = time.perf_counter() - t
    out["drift_weights_bit_identical"] = all(np.array_equal(sess.weight(n), w) for n, w in weights.items())
    again = sess.run(None, feeds)[0]
    out["drift_max_abs_output"] = float(np.abs(again - first).max())
    out["drift_outputs_bit_identical"] = bool(np.array_equal(again, first))
    return out


def peft_swap(work: Path, cycles: int) -> dict:
    """PEFT's swap in PyTorch: unmerge the active adapter, merge the other (merge_adapter/unmerge_adapter)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    base = LlamaForCausalLM.from_pretrained(work / "torch_base", torch_dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base, work / "a1", adapter_name="a1")
        model.load_adapter(str(work / "a2"), adapter_name="a2")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    times = []
    model.set_adapter("a1")
    model.merge_adapter()
    merged_a1 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(cycles):
            t = time.perf_counter()
            model.unmerge_adapter()
            model.set_adapter("a2" if i % 2 == 0 else "a1")
            model.merge_adapter()
            times.append(time.perf_counter() - t)
        if cycles % 2:
            model.unmerge_adapter()
            model.set_adapter("a1")
            model.merge_adapter()
    drift = max((p.detach() - merged_a1[n]).abs().max().item() for n, p in model.named_parameters() if n in merged_a1)
    model.unmerge_adapter()
    base_drift = max((p.detach() - weights[n]).abs().max().item() for n, p in model.named_parameters() if n in weights)
    return {"swap_ms": _median_ms(times), "cycles": cycles, "drift_max_abs_a1": drift, "drift_max_abs_base": base_drift}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--switches", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--peft-cycles", type=int, default=200)
    ap.add_argument("--blas-threads", default="1", help="OPENBLAS_NUM_THREADS for this run (set before numpy loads)")
    ap.add_argument("--child", choices=["plain", "merged"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lora-export-hotswap-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if (work / "info.json").exists():  # a reused --workdir
        info = json.loads((work / "info.json").read_text())
    else:
        info = setup(work)
        (work / "info.json").write_text(json.dumps(info))
    print(f"setup: {info} in {time.perf_counter() - t:.0f}s", flush=True)
    me = Path(__file__).resolve()
    memory = {v: run_child(me, "--child", v, "--workdir", str(work)) for v in ("plain", "merged")}
    print(f"memory: {memory}", flush=True)
    m = measure(work, args.switches, args.rounds)
    print(f"measured: {m}", flush=True)
    p = peft_swap(work, args.peft_cycles)
    print(f"peft: {p}", flush=True)

    ratio_switch = m["switch_ms"] / m["reload_ms"]
    ratio_run = m["run_ms"]["merged_session"] / m["run_ms"]["plain_merged_file"]
    ratio_noprepack = m["run_ms"]["plain_no_prepacking"] / m["run_ms"]["plain_merged_file"]
    mem = {v: {k: r["after"][k] - r["before"][k] for k in ("VmRSS", "RssAnon", "RssFile")} for v, r in memory.items()}
    rows = [
        ["switch (MergedSession.switch)", f"{m['switch_ms']:.1f} ms", f"{ratio_switch:.3f}x reload", "<= 0.03x"],
        ["reload (new session on merged file)", f"{m['reload_ms']:.0f} ms", "1x", ""],
        ["merge_file + new session", f"{m['merge_and_reload_ms']:.0f} ms", "", ""],
        ["lora-export merge (CLI wall)", f"{m['merge_cli_wall_ms']:.0f} ms", "", ""],
        ["PEFT unmerge+merge swap (PyTorch)", f"{p['swap_ms']:.1f} ms", "", ""],
        ["run after switch", f"{m['run_ms']['merged_session']:.1f} ms", f"{ratio_run:.3f}x plain", "<= 1.05x"],
        ["run, plain session on merged file", f"{m['run_ms']['plain_merged_file']:.1f} ms", "1x", ""],
        ["run, plain, prepacking off", f"{m['run_ms']['plain_no_prepacking']:.1f} ms", f"{ratio_noprepack:.3f}x", ""],
        [f"drift after {m['drift_switches']} switches", f"{m['drift_max_abs_output']:g}", "bit-identical"
         if m["drift_outputs_bit_identical"] and m["drift_weights_bit_identical"] else "DRIFT", "0"],
        [f"PEFT drift after {p['cycles']} swaps", f"{p['drift_max_abs_a1']:g}", "", ""],
        ["RSS growth plain / merged session", f"{mem['plain']['VmRSS']:.0f} / {mem['merged']['VmRSS']:.0f} MB",
         f"anon {mem['plain']['RssAnon']:.0f} / {mem['merged']['RssAnon']:.0f}", "no 2nd copy"],
    ]  # fmt: skip
    print()
    print_table(["what", "median", "ratio", "goal"], rows)
    data = {
        "benchmark": "hot_swap",
        "machine": machine_details(),
        "model": {"architecture": "LlamaForCausalLM", **CONFIG, **info, "dtype": "float32", "seq": SEQ, "batch": 1},
        "adapter": {"rank": RANK, "targets": TARGETS},
        "measured": m,
        "memory_mb": memory,
        "peft": p,
        "ratios": {
            "switch_vs_reload": ratio_switch,
            "run_vs_plain": ratio_run,
            "no_prepacking_vs_plain": ratio_noprepack,
        },
        "goals": {"switch_vs_reload_max": 0.03, "run_vs_plain_max": 1.05, "drift": 0},
        "memory_growth_mb": mem,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_average": os.getloadavg(),
        "notes": "medians; runs interleaved; memory: RSS growth of separate subprocesses (after imports) to after "
        "one run; CPU provider",
    }
    print(f"wrote {write_results('hot_swap', data)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

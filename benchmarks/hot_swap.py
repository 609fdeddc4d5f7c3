"""Benchmark ``MergedSession``'s in-place adapter switch on a LLaMA (fp32, external data, r=16 q/v adapters):
162M (``--size 162m``, default) or 954M (``--size 1b``: hidden 2048, 16 layers, 3.8 GB; fewer rounds).

Measures, on one machine in one run:
  switch    MergedSession.switch(a1 | a2), alternating (the q/v weights recomputed from pristine W₀ and written)
  reload    a new InferenceSession over merge's file (what a switch replaces), in rounds with the switches (one
            reload, then 12 switches: the ratio is the median of the rounds'); merge_file + that session
  run       after switch(a1) vs a plain session over merge's file for a1 (interleaved rounds, seq 64); 162m: a
            plain session with prepacking disabled too: what giving up ORT's weight prepacking would cost everywhere
  drift     N switches cycling a1 → a2 → None, then a1's weights and outputs bit-compared with the first ones
  memory    RSS (anonymous and file-backed) of a process holding a plain session vs one holding a MergedSession
            with both adapters, each after one run (separate subprocesses)
  peft      PEFT's unmerge → set_adapter → merge swap in PyTorch, 1 thread (time, and its drift after the cycles)
  steady    the run ratio again with single-threaded sessions, timed by the calling thread's CPU time and by
            ORT's profiler (kernel times of the MatMuls that read switched weights vs their prepacked twins):
            steadier than wall time on a shared machine; beside it MergedSession with the other transpose_feeds
  switch2   switches of that other MergedSession (its weights fed (un)transposed), for the trade-off

BLAS runs single-threaded here (``--blas-threads``, default 1, set before numpy loads): the rank-16 products are
too small to split, and on a busy 2-core VM OpenBLAS's spinning threads made one 768×16·16×768 product take
~26 ms instead of 0.25 ms. A server should do the same (``OPENBLAS_NUM_THREADS=1``).

Usage: python benchmarks/hot_swap.py [--size 162m|1b] [--workdir DIR] [--switches N] [--rounds N] [--blas-threads 1]
       (--setup-only: build the models in --workdir and stop; a reused --workdir skips the build)
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
from pathlib import Path

if __name__ == "__main__":  # before numpy loads: OpenBLAS reads it once
    _n = sys.argv[sys.argv.index("--blas-threads") + 1] if "--blas-threads" in sys.argv else "1"
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = _n

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import export_logits, llama_with_external_data, machine_details, print_table, run_child, write_results  # noqa: E402
from _hot_swap_peft import peft_swap  # noqa: E402
from _kernel_profile import interleaved, kernel_rounds, ratio, reading_nodes, session_options  # noqa: E402

SIZES = {
    "162m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16),
}
# Run counts per size (switches, rounds, peft cycles, steady rounds, reloads): a 1B run costs ~10x more.
COUNTS = {"162m": (10000, 20, 30, 40, 7), "1b": (30, 4, 6, 6, 3)}
CONFIG = dict(vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False, **SIZES["162m"])
RANK = 16
TARGETS = ["q_proj", "v_proj"]
SEQ = 64


def setup(work: Path) -> dict:
    """The base (torch weights and ONNX with external data), two random r=16 q/v adapters, merge's file for a1."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_export import merge_file

    model, params = llama_with_external_data(work, CONFIG, lambda m, p: export_logits(m, p, dynamic=True))
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


def measure(work: Path, switches: int, rounds: int, reloads: int, noprepacking: bool) -> dict:
    from lora_export import MergedSession, merge_file

    feeds = _feeds(7)
    out: dict = {}
    _plain(work / "merged_a1.onnx")  # page cache warm
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
    for f in work.glob("merged_a2*"):  # a 1B file is 4.4 GB: keep the disk for what is measured next
        f.unlink()

    t = time.perf_counter()
    sess = MergedSession(work / "base.onnx", ["CPUExecutionProvider"], adapters={"a1": work / "a1", "a2": work / "a2"})
    out["open_merged_session_ms"] = (time.perf_counter() - t) * 1000
    out["targeted_initializers"] = len(sess.targeted_initializers)
    # reload (a new session over merge's file) and switches in interleaved rounds: one reload, then 12 switches.
    times, compute, write, reload, per_round = [], [], [], [], []
    for _ in range(reloads):
        t = time.perf_counter()
        _plain(work / "merged_a1.onnx")
        reload.append(time.perf_counter() - t)
        these = []
        for i in range(12):
            rep = sess.switch("a1" if i % 2 else "a2")
            these.append(rep["timings"]["total"])
            compute.append(rep["timings"]["compute"])
            write.append(rep["timings"]["write"])
        times += these
        per_round.append(statistics.median(these) / reload[-1])
    out["reload_ms"] = _median_ms(reload)
    out["switch_ms"] = _median_ms(times)
    out["switch_vs_reload_median_of_rounds"] = statistics.median(per_round)
    out["switch_compute_ms"] = _median_ms(compute)
    out["switch_write_ms"] = _median_ms(write)

    # run time: interleaved rounds, each session warmed first.
    sess.switch("a1")
    plain = _plain(work / "merged_a1.onnx")
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
    fns = {"merged_session": lambda: sess.run(None, feeds), "plain_merged_file": lambda: plain.run(None, feeds)}
    if noprepacking:  # a third copy of the weights: 162m only
        noprepack = _plain(work / "merged_a1.onnx", prepacking=False)
        fns["plain_no_prepacking"] = lambda: noprepack.run(None, feeds)
    runs = interleaved(fns, rounds)
    out["run_ms"] = {k: _median_ms(v["wall"]) for k, v in runs.items()}
    out["run_ratio_median_of_rounds"] = {
        k: ratio(v["wall"], runs["plain_merged_file"]["wall"]) for k, v in runs.items()
    }

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


def steady(work: Path, rounds: int, other: bool) -> dict:
    """Run ratios from single-threaded sessions: thread CPU time and ORT's per-kernel times (see the docstring).
    ``other``: also a MergedSession with the other choice of ``transpose_feeds`` than its default."""
    import onnxruntime as ort

    from lora_export import MergedSession

    prof = work / "profiles"
    prof.mkdir(exist_ok=True)
    feeds = _feeds(7)
    cpu = ["CPUExecutionProvider"]
    plain = ort.InferenceSession(str(work / "merged_a1.onnx"), session_options(prof / "plain"), providers=cpu)
    sessions = {"plain_merged_file": plain}
    both = {"a1": work / "a1", "a2": work / "a2"}
    ms = MergedSession(work / "base.onnx", cpu, adapters=both, sess_options=session_options(prof / "ms"))
    sessions["merged_session"] = ms
    if other:  # the other choice of transpose_feeds (default: True)
        flip = not ms._flipped
        key = "merged_session_transposed_feed" if flip else "merged_session_untransposed_feed"
        so = session_options(prof / "other")
        sessions[key] = MergedSession(work / "base.onnx", cpu, adapters=both, sess_options=so, transpose_feeds=flip)
    switched = {k: s for k, s in sessions.items() if isinstance(s, MergedSession)}
    switch_s = {k: [] for k in switched}
    for i in range(20):  # switches, interleaved: what each choice of transpose_feeds costs a switch
        for k, s in switched.items():
            switch_s[k].append(s.switch("a1" if i % 2 else "a2")["timings"]["total"])
    fns = {k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}
    # Kernel times from a few profiled rounds; then the profiler is off and the thread-CPU rounds run.
    interleaved(fns, max(3, rounds // 3))
    nodes = reading_nodes(work / "merged_a1.onnx", set(ms.targeted_initializers))
    kernels = {}
    for k, s in sessions.items():
        kernels[k] = kernel_rounds((s._session if isinstance(s, MergedSession) else s).end_profiling(), nodes, 1)
    runs = interleaved(fns, rounds)
    base, cpu0 = kernels["plain_merged_file"], runs["plain_merged_file"]["cpu"]
    out = {"rounds": rounds, "targeted_nodes": len(nodes)}
    for k in sessions:
        out[k] = {
            "thread_cpu_ms": _median_ms(runs[k]["cpu"]),
            "thread_cpu_min_ms": min(runs[k]["cpu"]) * 1000,
            "wall_ms": _median_ms(runs[k]["wall"]),
            "targeted_kernels_ms": _median_ms(kernels[k][0]),
            "all_kernels_ms": _median_ms(kernels[k][1]),
            "thread_cpu_ratio": ratio(runs[k]["cpu"], cpu0),
            "thread_cpu_min_ratio": min(runs[k]["cpu"]) / min(cpu0),
            "targeted_kernels_ratio": ratio(kernels[k][0], base[0]),
            "all_kernels_ratio": ratio(kernels[k][1], base[1]),
        }
        if k in switch_s:
            out[k]["switch_ms"] = _median_ms(switch_s[k])
            out[k]["transposed_weights"] = len(sessions[k]._flipped)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="162m")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--switches", type=int, help="drift cycles (default 10000; 1b: 30)")
    ap.add_argument("--rounds", type=int, help="interleaved run rounds (default 20; 1b: 4)")
    ap.add_argument("--peft-cycles", type=int, help="PEFT swaps (default 30; 1b: 6)")
    ap.add_argument("--steady-rounds", type=int, help="single-threaded rounds (default 40; 1b: 6)")
    ap.add_argument("--setup-only", action="store_true", help="build the models in --workdir and stop")
    ap.add_argument("--blas-threads", default="1", help="OPENBLAS_NUM_THREADS for this run (set before numpy loads)")
    ap.add_argument("--child", choices=["plain", "merged"])
    args = ap.parse_args()
    CONFIG.update(SIZES[args.size])
    switches, rounds, cycles, steady_rounds, reloads = COUNTS[args.size]
    switches = args.switches if args.switches is not None else switches
    rounds, cycles = args.rounds or rounds, args.peft_cycles or cycles
    steady_rounds = args.steady_rounds or steady_rounds
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
    print(f"setup ({args.size}): {info} in {time.perf_counter() - t:.0f}s", flush=True)
    if args.setup_only:
        return
    me = Path(__file__).resolve()
    load = [os.getloadavg()]
    memory = {v: run_child(me, "--child", v, "--workdir", str(work), "--size", args.size) for v in ("plain", "merged")}
    print(f"memory: {memory}", flush=True)
    m = measure(work, switches, rounds, reloads, noprepacking=args.size == "162m")
    print(f"measured: {m}", flush=True)
    load.append(os.getloadavg())
    st = steady(work, steady_rounds, other=True)
    print(f"steady: {st}", flush=True)
    load.append(os.getloadavg())
    p = peft_swap(work, cycles)
    print(f"peft: {p}", flush=True)
    load.append(os.getloadavg())

    ratio_switch = m["switch_vs_reload_median_of_rounds"]
    ratio_run = m["run_ratio_median_of_rounds"]["merged_session"]
    ms_steady = st["merged_session"]
    mem = {v: {k: r["after"][k] - r["before"][k] for k in ("VmRSS", "RssAnon", "RssFile")} for v, r in memory.items()}
    runs = m["run_ms"]
    rows = [
        ["switch (MergedSession.switch)", f"{m['switch_ms']:.1f} ms", f"{ratio_switch:.3f}x reload", "<= 0.03x"],
        ["reload (new session on merged file)", f"{m['reload_ms']:.0f} ms", "1x", ""],
        ["merge_file + new session", f"{m['merge_and_reload_ms']:.0f} ms", "", ""],
        ["lora-export merge (CLI wall)", f"{m['merge_cli_wall_ms']:.0f} ms", "", ""],
        ["PEFT unmerge+merge swap (PyTorch, 1 thread)", f"{p['swap_ms']:.1f} ms", "", ""],
        ["run after switch (wall)", f"{runs['merged_session']:.1f} ms", f"{ratio_run:.3f}x plain", "<= 1.05x"],
        ["run, plain session on merged file", f"{runs['plain_merged_file']:.1f} ms", "1x", ""],
        ["run after switch, 1 thread (thread CPU)", f"{ms_steady['thread_cpu_ms']:.1f} ms",
         f"{ms_steady['thread_cpu_ratio']:.3f}x plain (min {ms_steady['thread_cpu_min_ratio']:.3f}x)", "<= 1.05x"],
        ["  its q/v kernels (ORT profiler)", f"{ms_steady['targeted_kernels_ms']:.2f} ms",
         f"{ms_steady['targeted_kernels_ratio']:.3f}x prepacked", ""],
    ]  # fmt: skip
    for key in ("merged_session_untransposed_feed", "merged_session_transposed_feed"):
        if key in st:
            old = st[key]
            both = f"{old['thread_cpu_ratio']:.3f}x; q/v kernels {old['targeted_kernels_ratio']:.3f}x; switch "
            both += f"{old['switch_ms']:.0f} ms vs {ms_steady['switch_ms']:.0f} ms"
            rows.append([f"  {key.split('_', 2)[2].replace('_', ' ')}", f"{old['thread_cpu_ms']:.1f} ms", both, ""])
    if "plain_no_prepacking" in runs:
        rows.append(["run, plain, prepacking off", f"{runs['plain_no_prepacking']:.1f} ms",
                     f"{m['run_ratio_median_of_rounds']['plain_no_prepacking']:.3f}x", ""])  # fmt: skip
    rows += [
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
        "size": args.size,
        "machine": machine_details(),
        "model": {"architecture": "LlamaForCausalLM", **CONFIG, **info, "dtype": "float32", "seq": SEQ, "batch": 1},
        "adapter": {"rank": RANK, "targets": TARGETS},
        "measured": m,
        "steady": st,
        "memory_mb": memory,
        "peft": p,
        "ratios": {
            "switch_vs_reload": ratio_switch,
            "run_vs_plain_wall": ratio_run,
            "run_vs_plain_thread_cpu": ms_steady["thread_cpu_ratio"],
            "qv_kernels_vs_prepacked": ms_steady["targeted_kernels_ratio"],
        },
        "goals": {"switch_vs_reload_max": 0.03, "run_vs_plain_max": 1.05, "drift": 0},
        "memory_growth_mb": mem,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_average": {"start": load[0], "after_measure": load[1], "after_steady": load[2], "end": load[3]},
        "notes": "medians; runs interleaved, ratios are medians of per-round ratios; memory: RSS growth of "
        "separate subprocesses (after imports) to after one run; CPU provider; steady: intra-op threads 1",
    }
    print(f"wrote {write_results('hot_swap' if args.size == '162m' else f'hot_swap-{args.size}', data)}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

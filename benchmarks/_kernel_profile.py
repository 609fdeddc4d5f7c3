"""Steady run-time ratios on a shared machine: single-threaded sessions (intra-op threads 1, so a run's kernels
execute on the calling thread), timed by that thread's CPU time (time stolen by other processes does not
count) and by ONNX Runtime's profiler (per-node kernel times, e.g. of the MatMuls that read switched weights).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def session_options(prefix: Path, *, threads: int = 1, prepacking: bool = True):
    """SessionOptions with ORT's profiler on (files start with ``prefix``) and ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    if not prepacking:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def reading_nodes(model_path: Path, weights: set[str]) -> set[str]:
    """Names of the nodes of ``model_path`` (main graph) that read one of ``weights``."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return {n.name for n in graph.node if weights & set(n.input)}


def kernel_rounds(profile: Path, nodes: set[str], skip: int) -> tuple[list[float], list[float]]:
    """Per run (after the first ``skip``): the kernel time (s) of ``nodes`` and of all nodes, from a profile."""
    per: dict[str, list[float]] = {}
    for e in json.loads(Path(profile).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] / 1e6)
    os.remove(profile)
    n = min(len(v) for v in per.values())
    chosen = [v for k, v in per.items() if k in nodes]
    return (
        [sum(v[i] for v in chosen) for i in range(skip, n)],
        [sum(v[i] for v in per.values()) for i in range(skip, n)],
    )


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Run each of ``fns`` once per round, in turn (one warm-up run each first); wall and thread-CPU seconds."""
    for fn in fns.values():
        fn()
    out = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            c, t = time.thread_time(), time.perf_counter()
            fn()
            out[k]["wall"].append(time.perf_counter() - t)
            out[k]["cpu"].append(time.thread_time() - c)
    return out


def ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a/b (rounds interleaved, so each pair saw the same machine load)."""
    return statistics.median(x / y for x, y in zip(a, b))

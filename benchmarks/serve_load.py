"""Load test of ``lora-export serve`` (Ray Serve) against one in-process LoraSession with the same batching.

A random-init LLaMA (~40M parameters, fp32, sequence 32, next-token logits out) with 8 adapters (r=16, q/v)
injected; 8 concurrent clients each send requests of one row for a random adapter. Routes, interleaved in
rounds in one run on one machine (every application deployed at once, so a round measures them all alike):
  in-process, batching on/off: ReplicaModel + Batcher (what one replica runs) driven by 8 asyncio clients
  HTTP, 2 replicas, batching on (max batch 8) / off (max batch 1), each replica on 1 ONNX Runtime thread
  HTTP, 1 replica, batching on / off, on 2 ONNX Runtime threads (on 2 cores; the CLI's choices for each)
Figures: requests/s (median over rounds), p50 and p99 latency (over all rounds), mean rows per executed group,
and where the CPU went (ms of CPU per request: replicas, Serve's HTTP proxy, Ray's other processes, the
clients, and processes that are not ours, on a shared machine). Goals: HTTP on / in-process on >= 0.8 and
HTTP on / HTTP off >= 2, each the median of per-round ratios. With a per-row model (``inject --per-row``) a
batch mixes adapters; without, it groups one adapter's rows.

Run: .venv/bin/python benchmarks/serve_load.py [--quick] [--per-row] [--rounds N] [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT.parent / "plugins"))
sys.path.insert(0, str(ROOT))

from _common import machine_details, print_table, write_results  # noqa: E402
from adapters import build_base, make_adapter  # noqa: E402

FULL = dict(hidden=512, layers=8, heads=8, intermediate=1408, vocab=16000)
QUICK = dict(hidden=128, layers=2, heads=4, intermediate=352, vocab=2000)
SEQ = 32
CLIENTS = 8
ADAPTERS = 8
# application name -> (replicas, max batch rows); each replica reserves cores / replicas CPUs, as the CLI gives
# them (and runs ONNX Runtime on that many threads)
HTTP_APPS = {"http_2rep_on": (2, 8), "http_2rep_off": (2, 1), "http_1rep_on": (1, 8), "http_1rep_off": (1, 1)}


def _feeds(cfg: dict, rng) -> dict:
    ids = rng.integers(0, cfg["vocab"], (1, SEQ)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _plan(cfg: dict, per_client: int, seed: int = 0) -> list[list[tuple[str, dict, bytes]]]:
    """Per client: (adapter, feeds, the JSON body carrying them)."""
    rng = np.random.default_rng(seed)
    names = [f"ad{i}" for i in range(ADAPTERS)]
    plan = []
    for _ in range(CLIENTS):
        jobs = []
        for _ in range(per_client):
            adapter, feeds = names[rng.integers(ADAPTERS)], _feeds(cfg, rng)
            body = json.dumps({"adapter": adapter, "inputs": {k: v.tolist() for k, v in feeds.items()}}).encode()
            jobs.append((adapter, feeds, body))
        plan.append(jobs)
    return plan


class CpuMeter:
    """CPU seconds per group of processes (ours by Ray's process titles; the rest of the machine apart)."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil

    def _group(self, pid: int, cmd: str) -> str:
        if pid == os.getpid():
            return "clients_and_driver"
        if "ServeReplica" in cmd:
            app = cmd.split("ServeReplica:", 1)[1].split(":", 1)[0] if "ServeReplica:" in cmd else "?"
            return f"replicas:{app}"
        if "ProxyActor" in cmd:
            return "http_proxy"
        if "ServeController" in cmd:
            return "serve_controller"
        if "ray" in cmd.lower() or "raylet" in cmd or "gcs_server" in cmd:
            return "ray_other"
        return "not_ours"

    def sample(self) -> tuple[dict[tuple[str, int], float], float]:
        per: dict[tuple[str, int], float] = {}
        for p in self.psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                t = p.cpu_times()
                per[(self._group(p.pid, cmd), p.pid)] = t.user + t.system
            except (self.psutil.Error, OSError):
                pass
        c = self.psutil.cpu_times()
        return per, c.user + c.system + c.nice + getattr(c, "irq", 0) + getattr(c, "softirq", 0)

    @staticmethod
    def diff(before, after) -> dict[str, float]:
        (b, busy0), (a, busy1) = before, after
        out: dict[str, float] = {}
        for (group, pid), t in a.items():
            out[group] = out.get(group, 0.0) + t - b.get((group, pid), 0.0)
        ours = sum(out.values()) - out.get("not_ours", 0.0)
        out["not_ours"] = max(0.0, busy1 - busy0 - ours)  # the machine's busy time, less ours
        return out


def in_process_runner(model_dir: Path):
    """A function running a plan through one ReplicaModel with batching on (8 rows) or off."""
    from lora_export_plugins.serve.batcher import Batcher
    from lora_export_plugins.serve.catalog import Catalog
    from lora_export_plugins.serve.replica import ReplicaModel

    model = ReplicaModel(model_dir, Catalog([model_dir]))  # ONNX Runtime's default threads: every core
    batchers = {rows: Batcher(model.run_group, max_rows=rows, wait_s=0.002, mixed=model.per_row) for rows in (8, 1)}

    def run(plan, rows: int, n: int | None = None) -> tuple[list[float], float, list[int]]:
        batcher, latencies = batchers[rows], []
        start = len(batcher.group_rows)

        async def client(jobs):
            for adapter, feeds, _ in jobs[:n]:
                t = time.perf_counter()
                await batcher.submit(adapter, feeds)
                latencies.append(time.perf_counter() - t)

        async def main():
            t = time.perf_counter()
            await asyncio.gather(*(client(jobs) for jobs in plan))
            return time.perf_counter() - t

        wall = asyncio.run(main())
        return latencies, wall, batcher.group_rows[start:]

    return run


def http_run(port: int, app: str, plan, n: int | None = None) -> tuple[list[float], float]:
    """8 client threads, one keep-alive connection each, posting their jobs in turn."""
    latencies: list[float] = []
    errors: list[str] = []

    def client(jobs):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for adapter, _, body in jobs[:n]:
            t = time.perf_counter()
            headers = {"serve_multiplexed_model_id": adapter, "Content-Type": "application/json"}
            conn.request("POST", f"/{app}/v1/run", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            latencies.append(time.perf_counter() - t)
            if r.status != 200:
                errors.append(f"{app}: HTTP {r.status}")
        conn.close()

    threads = [threading.Thread(target=client, args=(jobs,)) for jobs in plan]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    return latencies, wall


def group_rows(app: str) -> dict[str, list[int]]:
    """Replica -> rows of every group it ran, for each replica of ``app`` (asked until every one answered)."""
    from ray import serve

    handle, seen = serve.get_app_handle(app), {}
    replicas = HTTP_APPS[app][0]
    for _ in range(50):
        r = handle.batch_rows.remote().result()
        seen[r["replica"]] = r["rows"]
        if len(seen) == replicas:
            break
    return seen


def _summary(latencies: list[float], walls: list[float], counts: list[int], rows: list[int], cpu: dict) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    n = len(ms)
    return {
        "requests": n,
        "req_per_s": round(statistics.median(c / w for c, w in zip(counts, walls)), 2),
        "req_per_s_rounds": [round(c / w, 2) for c, w in zip(counts, walls)],
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(n - 1, int(0.99 * n))], 1),
        "mean_batch_rows": round(statistics.mean(rows), 2) if rows else None,
        "cpu_ms_per_request": {k: round(v * 1000 / n, 1) for k, v in sorted(cpu.items()) if v > 0.0005 * n},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--per-row", action="store_true", help="inject --per-row (mixed-adapter batches)")
    ap.add_argument("--requests", type=int, default=None, help="requests per client per round")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    per_client = args.requests or (5 if args.quick else 15)
    rounds = args.rounds or (2 if args.quick else 4)
    import ray
    from lora_export_plugins.serve import build_app
    from ray import serve

    from lora_export import inject_files

    meter = CpuMeter()
    loads = [os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="lxb"))
    routes = ["in_process_on", "in_process_off", *HTTP_APPS]
    got = {r: {"lat": [], "walls": [], "counts": [], "rows": [], "cpu": {}} for r in routes}
    try:
        base, params = build_base(cfg, work / "base.onnx", next_token=True)
        adapters = [make_adapter(cfg, i, work / f"ad{i}") for i in range(ADAPTERS)]
        kwargs = {"per_row": True} if args.per_row else {}
        inject_files(base, adapters, work / "served", **kwargs)
        plans = [_plan(cfg, per_client, seed) for seed in range(rounds)]
        local = in_process_runner(work / "served")
        # Logical CPUs: every application's reservation, all deployed at once (only one is loaded at a time).
        cores = os.cpu_count() or 1
        cpus = cores * len(HTTP_APPS)
        ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=str(work / "ray"), log_to_driver=False,
                 logging_level="ERROR")  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
        for app, (replicas, rows) in HTTP_APPS.items():
            built = build_app(work / "served", replicas=replicas, max_adapters_per_replica=ADAPTERS,
                              max_batch_size=rows, ray_actor_options={"num_cpus": cores / replicas})  # fmt: skip
            serve.run(built, name=app, route_prefix=f"/{app}")
        for rows in (8, 1):  # warm-up: every adapter loaded, every route's code paths run once
            local(plans[0], rows, 2)
        for app in HTTP_APPS:
            http_run(port, app, plans[0], 3)
        warm = {app: {k: len(v) for k, v in group_rows(app).items()} for app in HTTP_APPS}
        for plan in plans:
            for route in routes:
                before = meter.sample()
                if route.startswith("in_process"):
                    lat, wall, rows = local(plan, 8 if route.endswith("on") else 1)
                    got[route]["rows"] += rows
                else:
                    lat, wall = http_run(port, route, plan)
                cpu = CpuMeter.diff(before, meter.sample())
                g = got[route]
                g["lat"] += lat
                g["walls"].append(wall)
                g["counts"].append(len(lat))
                for k, v in cpu.items():
                    g["cpu"][k] = g["cpu"].get(k, 0.0) + v
        for app in HTTP_APPS:
            got[app]["rows"] = [x for k, v in group_rows(app).items() for x in v[warm[app].get(k, 0) :]]
        serve.shutdown()
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loads.append(os.getloadavg())
    results = {r: _summary(g["lat"], g["walls"], g["counts"], g["rows"], g["cpu"]) for r, g in got.items()}

    def ratio(a: str, b: str) -> float:
        per_round = [(ca / wa) / (cb / wb) for ca, wa, cb, wb in
                     zip(got[a]["counts"], got[a]["walls"], got[b]["counts"], got[b]["walls"])]  # fmt: skip
        return round(statistics.median(per_round), 3)

    ratios = {
        "http_2rep_on_vs_in_process_on": ratio("http_2rep_on", "in_process_on"),
        "http_2rep_on_vs_off": ratio("http_2rep_on", "http_2rep_off"),
        "http_1rep_on_vs_in_process_on": ratio("http_1rep_on", "in_process_on"),
        "http_1rep_on_vs_off": ratio("http_1rep_on", "http_1rep_off"),
        "in_process_on_vs_off": ratio("in_process_on", "in_process_off"),
    }
    print_table(
        ["route", "req/s", "p50 ms", "p99 ms", "rows/group", "CPU ms/req (ours)"],
        [
            [
                k,
                v["req_per_s"],
                v["p50_ms"],
                v["p99_ms"],
                v["mean_batch_rows"],
                round(sum(c for g, c in v["cpu_ms_per_request"].items() if g != "not_ours"), 1),
            ]  # fmt: skip
            for k, v in results.items()
        ],
    )
    print(json.dumps(ratios))
    print("load average (1, 5, 15 min) before/after:", loads)
    data = {
        "machine": machine_details() | {"load_average_before_after": loads},
        "model": cfg | {"params": params, "seq": SEQ, "rank": 16, "targets": "q_proj,v_proj"},
        "clients": CLIENTS,
        "adapters": ADAPTERS,
        "per_row": args.per_row,
        "rounds": rounds,
        "requests_per_client_per_round": per_client,
        "results": results,
        "ratios_median_per_round": ratios,
    }
    print(write_results("serve_load_quick" if args.quick else "serve_load", data))


if __name__ == "__main__":
    main()

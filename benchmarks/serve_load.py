"""Load test of ``lora-export serve`` (Ray Serve) against one in-process LoraSession with the same batching.

A random-init LLaMA (~40M parameters, fp32, sequence 32, next-token logits out) with 8 adapters (r=16, q/v)
injected; 8 concurrent clients each send requests of one row for a random adapter. Routes, in one run on one machine:
  (a) in-process: ReplicaModel + Batcher (what one replica runs) driven by 8 asyncio clients, no HTTP
  (b) HTTP, 2 replicas, batching on (max batch 8, 2 ms wait)
  (c) HTTP, 2 replicas, batching off (max batch 1)
Figures: requests/s, p50 and p99 latency; goals: (b)/(a) >= 0.8 and (b)/(c) >= 2. With a per-row model
(``inject --per-row``) a batch mixes adapters; without, it groups one adapter's rows.

Run: .venv/bin/python benchmarks/serve_load.py [--quick] [--per-row]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
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


def _feeds(cfg: dict, rng) -> dict:
    ids = rng.integers(0, cfg["vocab"], (1, SEQ)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _plan(cfg: dict, per_client: int) -> list[list[tuple[str, dict]]]:
    rng = np.random.default_rng(0)
    names = [f"ad{i}" for i in range(ADAPTERS)]
    return [[(names[rng.integers(ADAPTERS)], _feeds(cfg, rng)) for _ in range(per_client)] for _ in range(CLIENTS)]


def _summary(latencies: list[float], wall: float) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    return {
        "requests": len(ms),
        "req_per_s": round(len(ms) / wall, 2),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
    }


def in_process(model_dir: Path, plan) -> dict:
    from lora_export_plugins.serve.batcher import Batcher
    from lora_export_plugins.serve.catalog import Catalog
    from lora_export_plugins.serve.replica import ReplicaModel

    model = ReplicaModel(model_dir, Catalog([model_dir]))
    batcher = Batcher(model.run_group, max_rows=8, wait_s=0.002, mixed=model.per_row)
    latencies: list[float] = []

    async def client(jobs):
        for adapter, feeds in jobs:
            t = time.perf_counter()
            await batcher.submit(adapter, feeds)
            latencies.append(time.perf_counter() - t)

    async def main():
        await asyncio.gather(*(client(jobs[:2]) for jobs in plan))  # warm-up: load every adapter
        latencies.clear()
        t = time.perf_counter()
        await asyncio.gather(*(client(jobs) for jobs in plan))
        return time.perf_counter() - t

    wall = asyncio.run(main())
    return _summary(latencies, wall) | {"mean_batch_rows": round(statistics.mean(batcher.group_rows), 2)}


def over_http(url: str, plan) -> dict:
    latencies: list[float] = []

    def post(adapter, feeds):
        body = json.dumps({"adapter": adapter, "inputs": {k: v.tolist() for k, v in feeds.items()}}).encode()
        req = urllib.request.Request(url, data=body, headers={"serve_multiplexed_model_id": adapter})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
        return time.perf_counter() - t

    def client(jobs, record):
        for adapter, feeds in jobs:
            dt = post(adapter, feeds)
            if record:
                latencies.append(dt)

    def drive(record, n=None):
        threads = [threading.Thread(target=client, args=(jobs[:n] if n else jobs, record)) for jobs in plan]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - t

    drive(False, 2)
    wall = drive(True)
    return _summary(latencies, wall)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--per-row", action="store_true", help="inject --per-row (mixed-adapter batches)")
    ap.add_argument("--requests", type=int, default=None, help="requests per client")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    per_client = args.requests or (10 if args.quick else 40)
    import ray
    from lora_export_plugins.serve import build_app
    from ray import serve

    from lora_export import inject_files

    work = Path(tempfile.mkdtemp(prefix="lxb"))
    try:
        base, params = build_base(cfg, work / "base.onnx", next_token=True)
        adapters = [make_adapter(cfg, i, work / f"ad{i}") for i in range(ADAPTERS)]
        kwargs = {"per_row": True} if args.per_row else {}
        inject_files(base, adapters, work / "served", **kwargs)
        plan = _plan(cfg, per_client)
        results = {"in_process": in_process(work / "served", plan)}
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(work / "ray"), log_to_driver=False,
                 logging_level="ERROR")  # fmt: skip
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for label, rows in (("http_batching_on", 8), ("http_batching_off", 1)):
            app = build_app(work / "served", replicas=2, max_adapters_per_replica=ADAPTERS, max_batch_size=rows)
            serve.run(app, name=label, route_prefix=f"/{label}")
            results[label] = over_http(f"http://127.0.0.1:{port}/{label}/v1/run", plan)
            serve.delete(label)
        serve.shutdown()
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    on, off, inproc = results["http_batching_on"], results["http_batching_off"], results["in_process"]
    ratios = {
        "http_on_vs_in_process": round(on["req_per_s"] / inproc["req_per_s"], 3),
        "batching_on_vs_off": round(on["req_per_s"] / off["req_per_s"], 3),
    }
    print_table(
        ["route", "req/s", "p50 ms", "p99 ms"],
        [[k, v["req_per_s"], v["p50_ms"], v["p99_ms"]] for k, v in results.items()],
    )
    print(json.dumps(ratios))
    data = {
        "machine": machine_details(),
        "model": cfg | {"params": params, "seq": SEQ, "rank": 16, "targets": "q_proj,v_proj"},
        "clients": CLIENTS,
        "adapters": ADAPTERS,
        "per_row": args.per_row,
        "results": results,
        "ratios": ratios,
    }
    print(write_results("serve_load", data))


if __name__ == "__main__":
    main()

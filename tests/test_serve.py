"""``lora-export serve`` on a local Ray cluster: every response equals PEFT's, errors are clean, adapters churn.

One loopback-only cluster (2 CPUs) is shared by this module's tests. The pure parts (protocol, catalog,
batcher) are tested without Ray in test_serve_parts.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from inject_fixtures import build_case
from models import tiny_llama

serve = pytest.importorskip("ray.serve", reason="the serve extra (ray[serve]) is not installed")
import ray  # noqa: E402
from lora_export_plugins.serve import build_app  # noqa: E402

N_ADAPTERS = 16
ADAPTERS = {
    f"t{i:02d}": dict(
        r=(2, 4, 8)[i % 3],
        lora_alpha=(4, 8)[i % 2],
        use_rslora=i % 4 == 0,
        target_modules=["q_proj", "v_proj"] if i % 2 else ["q_proj", "v_proj", "o_proj"],
    )
    for i in range(N_ADAPTERS)
}


# Three replicas share the 2-CPU cluster (Serve's default of 1 CPU each would leave the third unscheduled).
CPUS = {"ray_actor_options": {"num_cpus": 0.5}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build_case(tmp_path_factory.mktemp("serve"), tiny_llama, ADAPTERS)


@pytest.fixture(scope="module")
def cluster():
    # A short private temp dir: Ray's socket paths must stay under the OS limit, and nothing lands in /tmp/ray.
    tmp = tempfile.mkdtemp(prefix="lxr")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False, logging_level="ERROR")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _request(url: str, body=None, adapter: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"serve_multiplexed_model_id": adapter} if adapter else {}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _row(case, row: int) -> dict:
    return {k: v[row : row + 1].tolist() for k, v in case.feeds.items()}


def _check(case, adapter: str | None, row: int, doc: dict) -> float:
    got = np.asarray(doc["outputs"]["output"], dtype=np.float32)
    want = (case.refs[adapter] if adapter else case.base_ref)[row : row + 1]
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def app(cluster, case):
    serve.run(
        build_app(case.out_dir, replicas=2, max_adapters_per_replica=4, max_batch_size=8, batch_wait_ms=5, **CPUS),
        name="lx",
        route_prefix="/",
    )
    yield cluster
    serve.delete("lx")


def test_mixed_load_matches_peft_with_adapters_churning(app, case):
    """16 adapters, 2 replicas holding 4 each, 8 clients x 50 requests mixing adapters and the base."""
    rng = np.random.default_rng(7)
    names = [None, *ADAPTERS]
    plan = [[(names[rng.integers(len(names))], int(rng.integers(2))) for _ in range(50)] for _ in range(8)]
    errors: list[str] = []
    worst = [0.0]

    def client(jobs):
        for adapter, row in jobs:
            status, doc = _request(f"{app}/v1/run", {"adapter": adapter, "inputs": _row(case, row)}, adapter)
            if status != 200:
                errors.append(f"{adapter}: {status} {doc}")
                continue
            worst[0] = max(worst[0], _check(case, adapter, row, doc))

    threads = [threading.Thread(target=client, args=(jobs,)) for jobs in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert worst[0] <= 1e-5


def test_endpoints_and_clean_errors(app, case):
    assert _request(f"{app}/healthz") == (200, {"status": "ok"})
    status, doc = _request(f"{app}/v1/adapters")
    assert status == 200 and doc["adapters"] == sorted(ADAPTERS)
    run = f"{app}/v1/run"
    status, doc = _request(run, {"adapter": "nope", "inputs": _row(case, 0)})
    assert status == 404 and "nope" in doc["error"]
    status, doc = _request(run, raw=b'{"adapter": "t01", "inputs": ')
    assert status == 400 and "not JSON" in doc["error"]
    floats = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in _row(case, 0).items()}
    floats = {k: [[x + 0.5 for x in r] for r in v] for k, v in floats.items()}
    status, doc = _request(run, {"adapter": "t01", "inputs": floats})
    assert status == 400 and "integers" in doc["error"]
    short = {k: [r[:-1] for r in v] for k, v in _row(case, 0).items()}
    status, doc = _request(run, {"adapter": "t01", "inputs": short})
    assert status == 400 and "shape" in doc["error"]
    status, doc = _request(run, {"adapter": None, "inputs": {"input_ids": _row(case, 0)["input_ids"]}})
    assert status == 400 and "attention_mask" in doc["error"]
    status, doc = _request(run, {"adapter": "t01", "inputs": _row(case, 0)}, adapter="t02")
    assert status == 400 and "routing header" in doc["error"]
    # the header alone names the adapter
    status, doc = _request(run, {"inputs": _row(case, 1)}, adapter="t03")
    assert status == 200 and _check(case, "t03", 1, doc) <= 1e-5


def test_an_adapter_dropped_into_the_folder_is_served_without_restart(cluster, case, tmp_path):
    extra = tmp_path / "more"
    extra.mkdir()
    serve.run(
        build_app(case.out_dir, adapters_dir=extra, max_adapters_per_replica=2, **CPUS), name="drop", route_prefix="/d"
    )
    try:
        url = f"{cluster}/d/v1/run"
        status, doc = _request(url, {"adapter": "late", "inputs": _row(case, 0)})
        assert status == 404 and "no adapter named 'late'" in doc["error"]
        shutil.copy(case.out_dir / "t05.onnx_adapter", extra / "late.onnx_adapter")
        status, doc = _request(url, {"adapter": "late", "inputs": _row(case, 0)}, "late")
        assert status == 200 and _check(case, "t05", 0, doc) <= 1e-5
        assert "late" in _request(f"{cluster}/d/v1/adapters")[1]["adapters"]
    finally:
        serve.delete("drop")


def _ray_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln]


@pytest.mark.parametrize("when", ["during_load", "serving"])
def test_sigterm_stops_cleanly_leaving_no_ray_processes(case, when):
    tmp = tempfile.mkdtemp(prefix="lxs")
    port = _free_port()
    env = {**os.environ, "RAY_TMPDIR": tmp, "PYTHONUNBUFFERED": "1"}
    code = "from lora_export.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", str(case.out_dir), "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line, deadline = "", time.monotonic() + 120
        wanted = "starting" if when == "during_load" else "serving"
        while wanted not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited early"
        if when == "during_load":
            time.sleep(1)  # Ray is starting, or Serve is loading the replica
        else:
            assert _request(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
        time.sleep(2)
        assert not _ray_processes(tmp)
    finally:
        if proc.poll() is None:
            proc.kill()
        for ln in _ray_processes(tmp):
            os.kill(int(ln.split()[0]), signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)

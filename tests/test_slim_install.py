"""A slim install (no torch, no onnxscript): every ONNX-side command works and never imports torch;
what needs torch says in one line which extra to install.

Each command runs in a fresh interpreter whose import system refuses ``torch`` and ``onnxscript`` the way
a venv without them would (ModuleNotFoundError), and records every attempt to import them: an attempt
that a command swallows (a fallback) still fails the test. Outputs are checked against PEFT's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from inject_fixtures import llama_case_fixture, rel_err  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

# The child: block the training extra, run the CLI (or a snippet), then report what it tried to import.
RUNNER = r"""
import importlib.abc, json, os, sys

BLOCKED = ("torch", "onnxscript")
tried = []


class NoTrainExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoTrainExtra())


def report():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    with open(os.environ["SLIM_REPORT"], "w") as f:
        json.dump({"tried": tried, "loaded": loaded}, f)


import atexit

atexit.register(report)
if sys.argv[1] == "-c":
    exec(sys.argv[2])
else:
    from lora_export.cli import main

    main(sys.argv[1:])
"""


def _slim(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    runner = tmp_path / "slim_runner.py"
    runner.write_text(RUNNER)
    report = tmp_path / f"slim-{len(list(tmp_path.glob('slim-*.json')))}.json"
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}",
        "SLIM_REPORT": str(report),
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, str(runner), *map(str, args)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    return proc, json.loads(report.read_text())


def _ok(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc, imports = _slim(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert imports == {"tried": [], "loaded": []}, (args[:1], imports)
    return proc


def _run(model: Path, feeds: dict, adapter: Path | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    ro = ort.RunOptions()
    if adapter is not None:
        ad = ort.LoraAdapter()
        ad.Load(str(adapter))
        ro.add_active_adapter(ad)
    out = sess.run(None, feeds, ro)[0]
    del ro  # keeps the adapter alive until here
    return out


def test_onnx_commands_need_no_torch(llama_case, tmp_path):
    c = llama_case
    merged = tmp_path / "merged.onnx"
    _ok(tmp_path, "merge", c.base_onnx, c.adapters["a_r4"], "-o", merged)
    assert rel_err(_run(merged, c.feeds), c.refs["a_r4"]) < TOL

    served = tmp_path / "served"
    _ok(tmp_path, "inject", c.base_onnx, c.adapters["a_r4"], c.adapters["b_r8"], "-o", served)
    late = tmp_path / "late.onnx_adapter"
    _ok(tmp_path, "convert", c.adapters["d_late"], "--model", served / "model.onnx", "-o", late)
    assert rel_err(_run(served / "model.onnx", c.feeds, late), c.refs["d_late"]) < TOL

    report = json.loads(_ok(tmp_path, "inspect", c.base_onnx, c.adapters["a_r4"], "--json").stdout)
    assert report and "error" not in report
    _ok(tmp_path, "verify", merged, merged)

    np.savez(tmp_path / "feeds.npz", **c.feeds)
    np.save(tmp_path / "ref.npy", c.refs["b_r8"])
    serve = (
        "import numpy as np\n"
        "from lora_export import LoraSession\n"
        f"s = LoraSession({str(served / 'model.onnx')!r}, providers=['CPUExecutionProvider'])\n"
        f"s.load_adapter('b', {str(served / 'b_r8.onnx_adapter')!r})\n"
        "feeds = dict(np.load('feeds.npz'))\n"
        "out = s.run(None, feeds, adapter='b')[0]\n"
        "ref = np.load('ref.npy')\n"
        f"assert np.abs(out - ref).max() / np.abs(ref).max() < {TOL}, 'served output differs from PEFT'\n"
    )
    _ok(tmp_path, "-c", serve)


@pytest.mark.parametrize(
    "args",
    [
        ("export", "factory.py:build", "out.onnx"),
        ("export", "factory.py:build", "out.onnx", "--torchscript"),
        ("-c", "import lora_export\nlora_export.attach_lora"),
    ],
    ids=["export", "export-torchscript", "training-api"],
)
def test_torch_features_say_which_extra(tmp_path, args):
    (tmp_path / "factory.py").write_text("def build():\n    raise AssertionError('never reached')\n")
    proc, _ = _slim(tmp_path, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines, proc.stderr
    assert "pip install 'lora-export[train]'" in lines[-1] and "torch" in lines[-1], proc.stderr
    if args[0] == "export":
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert not (tmp_path / "out.onnx").exists()

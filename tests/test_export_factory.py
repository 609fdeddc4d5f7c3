"""The export CLI around user code: a factory that exits is a one-line refusal (exit 2, nothing written),
what user code prints goes to stderr so that ``--json`` stdout is JSON only, and ``--opset`` behaves one
way: dynamo below its minimum opset is refused with what works instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import lora_export
from lora_export.cli import cli

FACTORY = """
import sys
import torch
from torch import nn

class Chatty(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        print("forward called")
        return self.fc(x)

def exit3():
    sys.exit(3)

def exit0():
    sys.exit(0)

def chatty():
    print("building the model")
    torch.manual_seed(0)
    return Chatty().eval(), (torch.randn(2, 4, generator=torch.Generator().manual_seed(1)),)
"""

EXITS_ON_IMPORT = "import sys\nsys.exit(0)\n\ndef build():\n    pass\n"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    (tmp_path / "factories.py").write_text(FACTORY)
    (tmp_path / "exits_on_import.py").write_text(EXITS_ON_IMPORT)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cli(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


@pytest.mark.parametrize(
    ("spec", "code"),
    [("factories.py:exit3", "3"), ("factories.py:exit0", "0"), ("exits_on_import.py:build", "0")],
    ids=["exit-3", "exit-0", "exit-0-on-import"],
)
def test_a_factory_that_exits_is_refused_in_one_line(work, spec, code):
    before = sorted(p.name for p in work.iterdir())
    res = _cli(spec, "out.onnx")
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and f"called sys.exit({code}) instead of returning" in res.stderr
    assert "nothing was exported" in res.stderr
    assert sorted(p.name for p in work.iterdir() if p.name != "__pycache__") == before


@pytest.mark.parametrize(
    "extra",
    # The redirect wraps both exporters alike; the dynamo run (slow) also covers torch's own prints.
    [pytest.param([], id="dynamo", marks=pytest.mark.slow), pytest.param(["--torchscript"], id="torchscript")],
)
def test_json_stdout_is_json_only_when_user_code_prints(work, extra):
    res = _cli("factories.py:chatty", "m.onnx", "--json", *extra)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["mapped"] == 1 and report["inputs"] == ["x"]
    assert "building the model" in res.stderr and "forward called" in res.stderr
    # The model written is the factory's.
    import importlib.util

    spec = importlib.util.spec_from_file_location("factories_for_check", work / "factories.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, _ = module.chatty()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort.InferenceSession("m.onnx", providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_json_stdout_in_a_real_process(work):
    proc = subprocess.run(
        [sys.executable, "-m", "lora_export", "export", "factories.py:chatty", "m.onnx", "--json", "--torchscript"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(lora_export.__file__).parent.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["exporter"] == "torchscript"
    assert "building the model" in proc.stderr


@pytest.mark.parametrize("opset", [7, 13, 17])
def test_dynamo_below_its_minimum_opset_is_refused_with_what_works(work, opset):
    res = _cli("factories.py:chatty", "m.onnx", "--opset", opset)
    assert res.exit_code == 2, res.output
    message = res.stderr.strip()
    assert "\n" not in message  # refused before the factory ran (it prints)
    assert f"cannot export opset {opset}: the dynamo exporter supports opsets 18 to 23" in message
    assert "use the TorchScript exporter (--torchscript), or an opset from 18 to 23" in message
    assert not (work / "m.onnx").exists()


def test_what_the_refusal_suggests_works(work):
    res = _cli("factories.py:chatty", "m.onnx", "--opset", 17, "--torchscript", "--json")
    assert res.exit_code == 0, res.output
    import onnx

    versions = {o.domain: o.version for o in onnx.load("m.onnx").opset_import}
    assert versions.get("", versions.get("ai.onnx")) == 17
    assert json.loads(res.stdout)["dynamic_axes"] == {"x": {"0": "batch"}}


def test_torchscript_above_its_maximum_points_at_dynamo(work):
    res = _cli("factories.py:chatty", "m.onnx", "--opset", 22, "--torchscript")
    assert res.exit_code == 2
    assert "use dynamo (no --torchscript), or an opset from 7 to 20" in res.stderr

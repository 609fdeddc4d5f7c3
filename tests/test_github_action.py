"""The composite GitHub Action (``plugins/github-action/action.yml``), run locally step by step.

How: ``action.yml`` is parsed with PyYAML; ``${{ inputs.X }}`` is substituted with the given inputs (or
their defaults) and any other expression fails the test; each ``run:`` step runs with its ``shell`` as
GitHub runs it (``bash --noprofile --norc -eo pipefail FILE``), its ``env``, and a fresh ``GITHUB_OUTPUT``
file; ``uses:`` steps (actions/setup-python) are skipped, and the install step (``pip install`` of the
``package`` input) is replaced by this environment: a ``python`` on ``PATH`` that is the interpreter
running the tests, with this checkout importable. The action's outputs are then evaluated from the steps'
``GITHUB_OUTPUT`` files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import peft_reference
from onnx_fixtures import export_onnx

REPO = Path(__file__).resolve().parents[1]
ACTION = REPO / "plugins" / "github-action" / "action.yml"
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 24)
        self.fc2 = torch.nn.Linear(24, 6)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture
def workspace(tmp_path):
    """A repository checkout as a workflow sees it: a recipe, a base model, a PEFT adapter, references."""
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    torch.manual_seed(0)
    base = Net().eval()
    x = torch.randn(3, 12)
    export_onnx(base, {"x": x}, ws / "models" / "base.onnx", dynamo=False)
    peft_model = peft_reference(base, seed=3, r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
    peft_model.save_pretrained(ws / "models" / "style")
    np.savez(ws / "models" / "inputs.npz", x=x.numpy())
    with torch.no_grad():
        np.savez(ws / "models" / "ref_style.npz", out=peft_model(x).numpy())
    (ws / "lora.toml").write_text(
        '[base]\nmodel = "models/base.onnx"\n[adapters]\nstyle = "models/style"\n'
        '[[artifact]]\nkind = "merged"\nadapters = ["style"]\n'
        '[[artifact]]\nkind = "injected"\nadapters = ["style"]\n'
        '[verify]\ninputs = "models/inputs.npz"\nreferences = { style = "models/ref_style.npz" }\n'
        "tolerance = 1e-5\nrtol = 1e-4\n"
    )
    return ws, peft_model


def _python_shim(folder: Path) -> Path:
    """``python`` → this interpreter, with this checkout (and its plugins) importable."""
    folder.mkdir()
    shim = folder / "python"
    path = os.pathsep.join([str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")])
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{path}" exec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    return folder


def _substitute(text: str, inputs: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        expr = m.group(1)
        assert expr.startswith("inputs."), f"unexpected expression in a step: {expr}"
        return inputs[expr.removeprefix("inputs.")]

    return EXPR.sub(one, text)


def _parse_outputs(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        assert sep, f"GITHUB_OUTPUT line without '=': {line!r}"
        out[key] = value
    return out


def run_action(ws: Path, given: dict[str, str], tmp: Path) -> tuple[dict[str, str], list[subprocess.CompletedProcess]]:
    """Run the action's steps in ``ws``; returns (the action's outputs, each run step's result). Stops at
    the first failing step, as GitHub does."""
    action = yaml.safe_load(ACTION.read_text())
    spec = action["inputs"]
    missing = [k for k, v in spec.items() if v.get("required") and k not in given]
    assert not missing, f"required inputs not given: {missing}"
    inputs = {k: str(given.get(k, v.get("default", ""))) for k, v in spec.items()}
    env = {**os.environ, "PATH": f"{_python_shim(tmp / 'bin')}{os.pathsep}{os.environ['PATH']}"}
    env["GITHUB_ACTION_PATH"] = str(ACTION.parent)
    step_outputs: dict[str, dict[str, str]] = {}
    results = []
    for n, step in enumerate(action["runs"]["steps"]):
        if "uses" in step:
            assert step["uses"].startswith("actions/setup-python@")
            assert _substitute(step["with"]["python-version"], inputs) == inputs["python-version"]
            continue
        if "pip install" in step["run"]:
            # Replaced by this environment (the shim's python already imports this checkout).
            assert any("inputs.package" in v for v in step.get("env", {}).values())
            continue
        assert step["shell"] == "bash"
        script = tmp / f"step{n}.sh"
        script.write_text(_substitute(step["run"], inputs))
        output_file = tmp / f"output{n}"
        output_file.write_text("")
        step_env = {**env, **{k: _substitute(str(v), inputs) for k, v in step.get("env", {}).items()}}
        step_env["GITHUB_OUTPUT"] = str(output_file)
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=ws,
            env=step_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        results.append(proc)
        if proc.returncode != 0:
            return {}, results
        if "id" in step:
            step_outputs[step["id"]] = _parse_outputs(output_file)
    outputs = {}
    for name, out in action["outputs"].items():
        m = EXPR.fullmatch(out["value"].strip())
        step_id, _, key = m.group(1).removeprefix("steps.").partition(".outputs.")
        outputs[name] = step_outputs[step_id][key]
    return outputs, results


def test_action_declares_its_interface():
    action = yaml.safe_load(ACTION.read_text())
    assert action["runs"]["using"] == "composite"
    assert {"recipe", "output-dir", "python-version"} <= set(action["inputs"])
    assert action["inputs"]["recipe"]["required"] is True
    assert "manifest" in action["outputs"]
    for step in action["runs"]["steps"]:
        # Inputs reach scripts through env only: an input is never pasted into shell code.
        assert "run" not in step or not EXPR.search(step["run"]), step["run"]


def test_action_builds_and_outputs_the_manifest(workspace, tmp_path):
    ws, peft_model = workspace
    outputs, results = run_action(ws, {"recipe": "lora.toml", "output-dir": "out/dist"}, tmp_path)
    assert results and results[-1].returncode == 0, results[-1].stderr
    manifest = ws / outputs["manifest"]
    assert manifest == ws / "out" / "dist" / "manifest.json" and manifest.is_file()
    data = json.loads(manifest.read_text())
    assert {a["path"] for a in data["artifacts"]} == {"merged/style", "injected"}
    assert all(f["passed"] for a in data["artifacts"] for f in a["verification"]["adapters"]["style"])
    import onnxruntime as ort

    x = torch.randn(3, 12)  # fresh values; the export has static shapes
    session = ort.InferenceSession(str(ws / "out/dist/merged/style/model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = peft_model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_action_fails_the_job_when_verification_fails(workspace, tmp_path):
    ws, _ = workspace
    ref = np.load(ws / "models" / "ref_style.npz")["out"]
    np.savez(ws / "models" / "ref_style.npz", out=ref * 1.5)
    outputs, results = run_action(ws, {"recipe": "lora.toml"}, tmp_path)
    assert results[-1].returncode == 1 and "verification failed" in results[-1].stderr
    assert not outputs and not (ws / "dist").exists()

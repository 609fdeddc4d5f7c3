"""The hand-built tiny model of ``robust_fixtures`` computed in plain numpy, with or without a PEFT
adapter read straight from its files (json + safetensors): the independent reference for CLI tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from robust_fixtures import tiny_model
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]


def reference(ids: np.ndarray, adapter_dir: Path | None = None) -> np.ndarray:
    """y = (emb[ids] @ fc.T + b) @ proj, with the adapter's ΔW = α/r · B·A added to emb and fc."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in tiny_model().graph.initializer}
    emb, fc = w["emb.weight"], w["fc.weight"]
    if adapter_dir is not None:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        raw = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
        t = {k: v.astype(np.float64) for k, v in raw.items()}
        s = cfg["lora_alpha"] / cfg["r"]
        p = "base_model.model."
        emb = emb + s * (t[p + "emb.lora_embedding_B"] @ t[p + "emb.lora_embedding_A"]).T
        fc = fc + s * t[p + "fc.lora_B.weight"] @ t[p + "fc.lora_A.weight"]
    return (emb[ids] @ fc.T + w["fc.bias"]) @ w["proj.weight"]


def run_cli(*args: object, cwd: Path, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """``lora-export ARGS`` run in ``cwd``: in this process (click's runner: fast), or with ``subprocess_``
    in a fresh interpreter (this checkout's package) as a user runs it."""
    if not subprocess_:
        from click.testing import CliRunner

        from lora_export.cli import cli

        with contextlib.chdir(cwd):
            res = CliRunner().invoke(cli, [str(a) for a in args])
        return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "plugins")]))
    env.pop("LORA_EXPORT_DEBUG", None)
    cmd = [sys.executable, "-c", "from lora_export.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(res: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single ``error: ...`` line of a failed command (exit ``code``), without its prefix."""
    assert res.returncode == code, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), repr(res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    return res.stderr[len("error: ") : -1]


def with_metadata(src: Path, dst: Path, key: str, value: str) -> Path:
    """A copy of the model at ``src`` with metadata ``key`` set to ``value``."""
    model = onnx.load(str(src))
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            break
    else:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))
    return dst

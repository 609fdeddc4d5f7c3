"""Benchmark helpers: machine details, JSON results, plain-text tables, timed subprocess runs."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - a missing package is just "None" here
        return None


def machine_details() -> dict:
    """CPU, cores, RAM, OS and the versions that matter, plus the date (UTC)."""
    return {
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnx_ir": _version("onnx-ir"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, data: dict) -> Path:
    """Write ``benchmarks/results/<name>-<host>-<date>.json``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    path = RESULTS / f"{name}-{socket.gethostname()}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run_child(script: Path, *args: str) -> dict:
    """Run ``python script *args`` in a fresh process; it prints one JSON object as its last line."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A CLI child that reports, on its last stderr line, whether torch (or sympy) loaded and which ml_dtypes.
CLI_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write("
    "f\"\\nPROBE torch={'torch' in sys.modules} sympy={'sympy.core' in sys.modules} "
    "ml_dtypes={getattr(sys.modules.get('ml_dtypes'), '__version__', None)}\\n\"))\n"
    "from lora_export.cli import main\n"
    "main(sys.argv[1:])\n"
)


def timed_process(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time (process start included), exit code, peak RSS (MB, this child alone)
    and any ``PROBE`` fields it printed (see ``CLI_PROBE``)."""
    import time

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = {"seconds": seconds, "exit": proc.returncode, "peak_rss_mb": usage.ru_maxrss / 1024}
    for line in stderr.splitlines():
        if line.startswith("PROBE "):
            out.update(dict(kv.split("=", 1) for kv in line.split()[1:]))
    if proc.returncode not in (0, 2):
        out["stderr"] = stderr[-2000:]
    return out


def cli_command(probe: Path, *args: str) -> list[str]:
    """The command line that runs ``lora-export *args`` through ``probe`` (a file holding ``CLI_PROBE``)."""
    return [sys.executable, str(probe), *args]


def tree_path(tree: Path, first: list[str] | tuple[str, ...] = ()) -> str:
    """PYTHONPATH that imports lora_export from checkout ``tree``, after the folders ``first`` (e.g. the
    packages a new pin installs, before the venv is rebuilt); entries already set come last."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*map(str, first), str(tree), str(tree / "plugins"), *extra])


def export_logits(model, path: Path, *, dynamic: bool = False) -> None:
    """TorchScript export of a transformers causal LM as ``(input_ids, attention_mask) -> logits`` (no cache),
    batch and sequence dynamic when asked."""
    import warnings

    import torch

    class Logits(torch.nn.Module):
        # Explicit attention mask: without one, transformers' mask code uses ops TorchScript cannot export.
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    axes = {0: "batch", 1: "seq"}
    extra = {"output_names": ["logits"], "dynamic_axes": {"input_ids": axes, "attention_mask": axes}} if dynamic else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model),
            (ids, torch.ones_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            dynamo=False,
            **extra,
        )


def llama_with_external_data(work: Path, config: dict, export) -> tuple[object, int]:
    """A random-init LlamaForCausalLM (seed 0) built from ``config``: its weights saved as safetensors in
    ``work/torch_base``, and ``export(model, path)``'s ONNX re-saved with all weights in ``base.onnx.data``.
    Returns the model and its parameter count."""
    import onnx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="eager")).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "torch_base", safe_serialization=True)
    # onnx appends to an existing data file: a reused --workdir would grow it with dead bytes on every run.
    (work / "base.onnx.data").unlink(missing_ok=True)
    export(model, work / "base.onnx")
    proto = onnx.load(str(work / "base.onnx"))
    onnx.save(proto, str(work / "base.onnx"), save_as_external_data=True, location="base.onnx.data", size_threshold=0)
    return model, params

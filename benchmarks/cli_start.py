"""CLI start-up: wall time of short commands, interpreter start included, beside ``python -c pass``.

Each command runs ``--runs`` times in a fresh process (the order interleaved, so a busy moment hits all
alike); the table quotes medians. Commands:
  python -c pass          the interpreter alone (the floor)
  --help                  ``lora-export --help``
  refusal                 ``lora-export merge missing.onnx missing -o out.onnx`` (one error line, exit 2)
  inspect --json          ``lora-export inspect tiny.onnx --json`` on a 2-layer MatMul model
  torch loaded?           whether any of these imported torch (the goal: never)

``--baseline DIR`` times another checkout (e.g. the commit before a change) in the same run, with the
same interpreter and packages. Usage: python benchmarks/cli_start.py [--runs 9] [--baseline DIR] [--this-path PKGS]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CLI_PROBE,
    cli_command,
    machine_details,
    print_table,
    timed_process,
    tree_path,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
GOALS = {"help": 0.25, "refusal": 0.35, "inspect_json": 0.8}


def tiny_model(path: Path) -> Path:
    """A 2-layer MatMul model (16 → 32 → 16, named weights), as a small exported model looks."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "layers.0.proj.weight")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "layers.1.proj.weight")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "layers.0.proj.weight"], ["h"], name="/layers.0/proj/MatMul"),
            helper.make_node("Relu", ["h"], ["r"], name="/layers.0/Relu"),
            helper.make_node("MatMul", ["r", "layers.1.proj.weight"], ["y"], name="/layers.1/proj/MatMul"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[w1, w2],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _commands(work: Path) -> dict[str, list[str]]:
    model = tiny_model(work / "tiny.onnx")
    return {
        "python_pass": ["-c", "pass"],
        "help": ["--help"],
        "refusal": ["merge", str(work / "missing.onnx"), str(work / "missing"), "-o", str(work / "out.onnx")],
        "inspect_json": ["inspect", str(model), "--json"],
    }


def _run(tree: Path, args: list[str], probe: Path, first: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": tree_path(tree, first)}
    cmd = [sys.executable, *args] if args[0] == "-c" else cli_command(probe, *args)
    got = timed_process(cmd, env)
    return got.pop("seconds"), got


def _commit(tree: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--baseline", type=Path, help="another checkout to time in the same run")
    ap.add_argument(
        "--this-path", action="append", default=[], help="a folder put first on PYTHONPATH for this checkout only"
    )
    args = ap.parse_args()
    trees = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    firsts = {"this": args.this_path, "baseline": []}
    with tempfile.TemporaryDirectory(prefix="lora-export-start-") as tmp:
        work = Path(tmp)
        probe = work / "probe.py"
        probe.write_text(CLI_PROBE)
        commands = _commands(work)
        times = {t: {c: [] for c in commands} for t in trees}
        info = {t: {} for t in trees}
        for c in commands:  # warm-up: bytecode caches and the page cache, not timed
            for t, tree in trees.items():
                _run(tree, commands[c], probe, firsts[t])
        for _ in range(args.runs):
            for c, cmd in commands.items():
                for t, tree in trees.items():
                    seconds, got = _run(tree, cmd, probe, firsts[t])
                    times[t][c].append(seconds)
                    info[t][c] = got
    med = {t: {c: statistics.median(v) for c, v in cs.items()} for t, cs in times.items()}
    headers = ["command", *(f"{t} median s" for t in trees), "goal s", "exit", "torch loaded", "ml_dtypes"]
    rows = []
    for c in commands:
        goal = GOALS.get(c)
        rows.append(
            [
                c,
                *(f"{med[t][c]:.3f}" for t in trees),
                f"{goal:.2f}" if goal else "-",
                info["this"][c].get("exit"),
                info["this"][c].get("torch", "-"),
                " / ".join(str(info[t][c].get("ml_dtypes", "-")) for t in trees),
            ]
        )
    print_table(headers, rows)
    data = {
        "benchmark": "cli_start",
        "machine": machine_details(),
        "runs": args.runs,
        "trees": {t: {"path": str(p), "commit": _commit(p), "first_on_path": firsts[t]} for t, p in trees.items()},
        "seconds": times,
        "median_seconds": med,
        "children": info,
        "goals_seconds": GOALS,
        "notes": "wall time of a fresh process per run (interpreter start included), order interleaved; "
        "one warm-up run per command first",
    }
    print(f"wrote {write_results('cli_start', data)}")


if __name__ == "__main__":
    main()

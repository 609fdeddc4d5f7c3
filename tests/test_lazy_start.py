"""Start-up stays light: the CLI loads a command's module (and numpy, onnx, onnx-ir) only when that command
runs, sympy only when a symbolic dimension is evaluated, and ``import lora_export`` imports none of them.
Behaviour, not timings (those are in benchmarks/cli_start.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("numpy", "onnx", "onnx_ir", "onnxruntime", "torch", "sympy.core", "ml_dtypes", "safetensors")


def _child(code: str, tmp_path: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'plugins'}", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loaded(expr: str) -> str:
    return f"import json, sys\n{expr}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"


@pytest.mark.parametrize(
    "expr",
    [
        "import lora_export, lora_export.errors",
        "from lora_export.cli import cli\ntry:\n    cli.main(['--help'], standalone_mode=False)\n"
        "except SystemExit:\n    pass",
        "from lora_export.cli import cli\ncli.main(['merge', '--help'], standalone_mode=False)",
    ],
    ids=["package", "help", "command-help"],
)
def test_start_imports_nothing_heavy(expr, tmp_path):
    assert _child(_loaded(expr), tmp_path) == []


def test_help_lists_every_command(tmp_path):
    from click.testing import CliRunner

    from lora_export.cli import cli
    from lora_export.cli.commands import LAZY_COMMANDS, plugin_entry_points

    out = CliRunner().invoke(cli, ["--help"]).output
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(LAZY_COMMANDS) | set(plugin_entry_points())
    for name in LAZY_COMMANDS:
        res = CliRunner().invoke(cli, [name, "--help"])
        assert res.exit_code == 0 and f"Usage: cli {name}" in res.output
    bad = CliRunner().invoke(cli, ["mrege"])
    assert bad.exit_code == 2 and "No such command" in bad.output


def test_sympy_waits_until_a_symbolic_dimension_is_evaluated(tmp_path):
    code = (
        "import json, sys\n"
        "from lora_export.cli._lazy_sympy import defer_sympy\n"
        "defer_sympy()\n"
        "import onnx_ir as ir\n"
        "before = 'sympy.core' in sys.modules\n"
        "d = ir.SymbolicDim('N') * 2 + 1\n"
        "import sympy\n"
        "value = int(d._expr.subs({s: 5 for s in d._expr.free_symbols}))\n"
        "from onnx_ir import _symbolic_shapes\n"
        "m = str(_symbolic_shapes.parse_symbolic_expression('max(a, b)'))\n"
        "print(json.dumps([before, 'sympy.core' in sys.modules, value, m, type(sympy.Max).__name__]))\n"
    )
    assert _child(code, tmp_path) == [False, True, 11, "Max(a, b)", "FunctionClass"]


@pytest.mark.parametrize("case", ["missing-adapter", "output-data-is-a-folder"])
def test_merge_refuses_before_heavy_imports_in_the_library_words(case, tmp_path):
    from click.testing import CliRunner

    from lora_export import LoraExportError, merge_file
    from lora_export.cli import cli

    out = tmp_path / "out.onnx"
    if case == "output-data-is-a-folder":
        (tmp_path / "out.onnx.data").mkdir()
    args = [str(tmp_path / "missing.onnx"), str(tmp_path / "no-adapter"), "-o", str(out)]
    with pytest.raises(LoraExportError) as library:
        merge_file(args[0], args[1], args[3])
    res = CliRunner().invoke(cli, ["merge", *args])
    assert res.exit_code == 2 and res.output.strip() == f"error: {library.value}"
    code = f"from lora_export.cli import main\ntry:\n    main(['merge', *{args!r}])\nexcept SystemExit:\n    pass"
    assert _child(_loaded(code), tmp_path) == []

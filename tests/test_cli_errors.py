"""The CLI's error contract: exactly one line on stderr and exit 2 for every error (1 for a failed verify,
130 for Ctrl-C), a JSON error object on stdout with --json, no library warnings or log lines, no raw
control characters from names or paths, and a one-line safety net for bugs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from robust_fixtures import tiny_model, write_adapter, write_model

import lora_export.graph.verbs.inspect as inspect_mod
from lora_export.cli import cli
from lora_export.errors import ModelError

HOSTILE = "a\x1b[31m\r\nb\x01c\u2028"


def _invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def _one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), repr(result.stderr)
    line = result.stderr[:-1]
    assert not any(c in line for c in "\x1b\r\x00\x01\u2028"), repr(line)
    return line[len("error: ") :]


@pytest.fixture
def noisy_inspect(monkeypatch):
    """``inspect`` that warns, logs and overflows the way onnx-ir, numpy and torch do, then fails."""

    def noisy(*_args, **_kwargs):
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        logging.getLogger("onnx_ir").warning("a library log record")
        logging.getLogger().error("a root log record")
        np.float32(3e38) * np.float32(10)  # RuntimeWarning: overflow
        raise ModelError("the real problem")

    monkeypatch.setattr(inspect_mod, "inspect_model", noisy)


def test_library_warnings_and_logs_add_no_lines(noisy_inspect):
    assert _one_error_line(_invoke("inspect", "m.onnx")) == "the real problem"


def test_control_characters_in_paths_are_escaped_in_errors(tmp_path):
    message = _one_error_line(_invoke("inspect", tmp_path / f"{HOSTILE}.onnx"))
    assert "model not found" in message and "\\x1b[31m\\r\\nb\\x01c\\u2028" in message


def test_control_characters_in_names_are_escaped_in_text_output(tmp_path):
    proto = tiny_model()
    proto.graph.node[1].name = f"/fc/{HOSTILE}/Gemm"
    result = _invoke("inspect", write_model(tmp_path / "m.onnx", proto))
    assert result.exit_code == 0, result.output
    assert not any(c in result.stdout for c in "\x1b\r\x01\u2028")
    assert "\\x1b[31m" in result.stdout
    plain = _invoke("inspect", write_model(tmp_path / "p.onnx"))
    assert result.stdout.count("\n") == plain.stdout.count("\n")


def test_nul_byte_in_an_argument_is_a_usage_error(tmp_path):
    assert "NUL" in _one_error_line(_invoke("inspect", f"{tmp_path}/a\x00b.onnx"))


def test_json_errors_also_go_to_stdout(tmp_path):
    result = _invoke("inspect", tmp_path / "missing.onnx", "--json")
    message = _one_error_line(result)
    assert json.loads(result.stdout) == {"error": message, "kind": "ModelError"}
    usage = _invoke("merge", "--json")
    assert json.loads(usage.stdout)["kind"] == "UsageError"


def test_unexpected_exception_is_one_line_internal_error(monkeypatch, tmp_path):
    def buggy(*_args, **_kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(inspect_mod, "inspect_model", buggy)
    message = _one_error_line(_invoke("inspect", "m.onnx", "--json"))
    assert message == ("internal error: RuntimeError: boom (please report; LORA_EXPORT_DEBUG=1 shows the traceback)")
    debug = _invoke("inspect", "m.onnx", env={"LORA_EXPORT_DEBUG": "1"})
    assert isinstance(debug.exception, RuntimeError)


def test_keyboard_interrupt_exits_130_with_one_line(monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_mod, "inspect_model", interrupted)
    assert _one_error_line(_invoke("inspect", "m.onnx"), code=130) == "interrupted"


def test_failed_verify_keeps_exit_1_and_one_json_document(tmp_path):
    a = write_model(tmp_path / "a.onnx")
    proto = tiny_model()
    proto.graph.initializer[1].float_data[:] = []
    proto.graph.initializer[1].raw_data = np.ones((6, 4), np.float32).tobytes()
    b = write_model(tmp_path / "b.onnx", proto)
    np.savez(tmp_path / "inputs.npz", ids=np.array([0, 1, 2], np.int64))
    result = _invoke("verify", a, b, "--inputs", tmp_path / "inputs.npz", "--json")
    _one_error_line(result, code=1)
    assert json.loads(result.stdout)["passed"] is False


def test_real_process_prints_one_line(tmp_path):
    """Through the console entry point and real file descriptors (the last-resort log handler included)."""
    model = write_model(tmp_path / "m.onnx")
    adapter = write_adapter(tmp_path / "ad")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = "(q)\\1"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-c", "from lora_export.cli import main; main()", "merge", str(model), str(adapter), "-o",
         str(tmp_path / "out.onnx")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "linear-time" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_onnx_ir_log_records_do_not_reach_stderr(tmp_path):
    """onnx-ir logs a warning for a node input no value produces; the CLI's stderr stays empty."""
    proto = tiny_model()
    proto.graph.node[2].input[0] = "nowhere"
    model = write_model(tmp_path / "m.onnx", proto)
    result = _invoke("merge", model, write_adapter(tmp_path / "ad"), "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""

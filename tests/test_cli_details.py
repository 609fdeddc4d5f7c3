"""CLI details (issue 8, item 3): named adapters for inject, stale-file cleanup of an inject folder,
what --allow-partial skipped, verify's output selection / shape mismatches / criterion / --dim check,
adapter paths given as a file in the adapter folder, ``python -m lora_export``, progress on a TTY only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from robust_fixtures import IN, OUT, write_adapter, write_model

from lora_export import Adapter, LoraConfig, LoraTarget, save_adapter_files
from lora_export.cli import _progress, cli
from lora_export.graph.verbs.inject import FILES_MANIFEST

ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), repr(result.stderr)
    return result.stderr[len("error: ") : -1]


@pytest.fixture
def base(tmp_path):
    return write_model(tmp_path / "base.onnx")


# -- 1. inject NAME=PATH ------------------------------------------------------------------------


def test_inject_names_adapters_explicitly(base, tmp_path):
    # Two folders both called "support": by folder name they collide; named, they do not.
    a = write_adapter(tmp_path / "team1" / "support", b_value=0.1)
    b = write_adapter(tmp_path / "team2" / "support", b_value=0.2)
    out = tmp_path / "out"
    line = _one_error_line(_invoke("inject", base, a, b, "-o", out))
    assert "support" in line and not out.exists()
    res = _invoke("inject", base, f"one={a}", f"two={b}", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert sorted(report["adapters"]) == ["one", "two"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [FILES_MANIFEST, "model.onnx", "one.onnx_adapter", "one.safetensors", "two.onnx_adapter", "two.safetensors"]
    )
    # A plain PATH keeps its folder name, also beside named ones.
    res = _invoke("inject", base, a, f"two={b}", "-o", tmp_path / "out2")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out2" / "support.onnx_adapter").is_file()


def test_inject_path_containing_equals_sign_is_a_path(base, tmp_path):
    a = write_adapter(tmp_path / "k=v")
    res = _invoke("inject", base, a, "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "k=v.onnx_adapter").is_file()


@pytest.mark.parametrize(
    ("name", "problem"),
    [("", "empty"), ("a/b", "path separator"), ("a\\b", "path separator"), (".hidden", "dot"), ("x\x01y", "control")],
)
def test_inject_refuses_bad_names(base, tmp_path, name, problem):
    a = write_adapter(tmp_path / "ad")
    out = tmp_path / "out"
    line = _one_error_line(_invoke("inject", base, f"{name}={a}", "-o", out))
    assert "bad adapter name" in line and problem in line and "\x01" not in line
    assert not out.exists()


def test_inject_refuses_a_folder_name_that_is_no_file_name(base, tmp_path):
    a = write_adapter(tmp_path / ".ad")
    line = _one_error_line(_invoke("inject", base, a, "-o", tmp_path / "out"))
    assert "starts with a dot" in line and "NAME=PATH" in line


# -- 2. stale files of an earlier inject --------------------------------------------------------


def test_inject_removes_only_the_stale_files_it_wrote(base, tmp_path):
    a = write_adapter(tmp_path / "a", b_value=0.1)
    b = write_adapter(tmp_path / "b", b_value=0.2)
    out = tmp_path / "out"
    assert _invoke("inject", base, a, b, "-o", out).exit_code == 0
    (out / "mine.txt").write_text("user file")
    (out / "late.onnx_adapter").write_bytes((out / "b.onnx_adapter").read_bytes())  # as `convert` would write
    res = _invoke("inject", base, a, f"renamed={b}", "-o", out)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert "b.onnx_adapter" not in names and "b.safetensors" not in names
    assert {"a.onnx_adapter", "renamed.onnx_adapter", "renamed.safetensors", "mine.txt", "late.onnx_adapter"} <= set(
        names
    )
    recorded = json.loads((out / FILES_MANIFEST).read_text())["files"]
    assert sorted(recorded) == sorted(["model.onnx", "a.onnx_adapter", "a.safetensors", *names_of("renamed")])
    assert "mine.txt" not in recorded and "late.onnx_adapter" not in recorded


def names_of(name: str) -> list[str]:
    return [f"{name}.onnx_adapter", f"{name}.safetensors"]


def test_inject_without_a_record_removes_nothing(base, tmp_path):
    a = write_adapter(tmp_path / "a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.onnx_adapter").write_bytes(b"not ours")
    assert _invoke("inject", base, a, "-o", out).exit_code == 0
    assert (out / "old.onnx_adapter").read_bytes() == b"not ours"


def test_an_edited_record_cannot_remove_other_files(base, tmp_path):
    a = write_adapter(tmp_path / "a")
    out = tmp_path / "out"
    assert _invoke("inject", base, a, "-o", out).exit_code == 0
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    (out / "keep.txt").write_text("y")
    record = {"files": ["../outside.txt", str(outside), "", ".", ".."]}
    (out / FILES_MANIFEST).write_text(json.dumps(record))
    assert _invoke("inject", base, a, "-o", out).exit_code == 0
    assert outside.read_text() == "x" and (out / "keep.txt").read_text() == "y"
    (out / FILES_MANIFEST).write_text("{not json")
    assert _invoke("inject", base, a, "-o", out).exit_code == 0
    assert (out / "keep.txt").exists()


# -- 3. merge --allow-partial lists what it skipped --------------------------------------------


def _partial_adapter(directory: Path) -> Path:
    rng = np.random.default_rng(3)
    targets = {
        "fc": LoraTarget(
            "fc", "linear", rng.standard_normal((2, IN)).astype(np.float32), np.ones((OUT, 2), np.float32), 1
        ),
        "ghost": LoraTarget(
            "ghost", "linear", rng.standard_normal((2, 5)).astype(np.float32), np.ones((7, 2), np.float32), 1
        ),
    }
    save_adapter_files(Adapter(targets, LoraConfig(r=2, lora_alpha=2, target_modules=["fc", "ghost"])), directory)
    return directory


def test_merge_allow_partial_lists_skipped_targets(base, tmp_path):
    ad = _partial_adapter(tmp_path / "partial")
    line = _one_error_line(_invoke("merge", base, ad, "-o", tmp_path / "m.onnx"))
    assert "ghost" in line
    res = _invoke("merge", base, ad, "-o", tmp_path / "m.onnx", "--allow-partial")
    assert res.exit_code == 0, res.output
    skipped = [ln for ln in res.stdout.splitlines() if ln.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped ghost: ") and len(skipped[0]) > len("skipped ghost: ")
    res = _invoke("merge", base, ad, "-o", tmp_path / "m2.onnx", "--allow-partial", "--json")
    report = json.loads(res.stdout)
    assert [s["target"] for s in report["skipped"]] == ["ghost"] and report["skipped"][0]["reason"]


# -- 4. verify ----------------------------------------------------------------------------------


def _two_output_model(path: Path, *, w_scale: float = 1.0, wide: bool = False) -> Path:
    """x[batch, 4] → y = x·W (batch, 3 or 5), z = x + 1; batch symbolic, the 4 fixed."""
    w = np.arange(4 * (5 if wide else 3), dtype=np.float32).reshape(4, -1) * w_scale
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Add", ["x", "one"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", None]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4]),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def test_verify_compares_a_named_subset(tmp_path):
    a = _two_output_model(tmp_path / "a.onnx")
    off = _two_output_model(tmp_path / "off.onnx", w_scale=2.0)  # y differs, z agrees
    assert _invoke("verify", a, off).exit_code == 1
    res = _invoke("verify", a, off, "--output", "z", "--json")
    assert res.exit_code == 0, res.output
    assert [o["name"] for o in json.loads(res.stdout)["outputs"]] == ["z"]
    res = _invoke("verify", a, off, "--output", "y", "--output", "z", "--json")
    assert res.exit_code == 1 and [o["name"] for o in json.loads(res.stdout)["outputs"]] == ["y", "z"]
    line = _one_error_line(_invoke("verify", a, off, "--output", "nope"))
    assert "'nope'" in line and "y, z" in line


def test_verify_subset_against_saved_references(tmp_path):
    a = _two_output_model(tmp_path / "a.onnx")
    refs = tmp_path / "refs"
    assert _invoke("verify", a, "--save-outputs", refs, "--output", "z").exit_code == 0
    assert sorted(p.name for p in refs.iterdir()) == ["inputs.npz", "z.npy"]
    res = _invoke("verify", a, "--reference", refs / "z.npy", "--inputs", refs / "inputs.npz", "--output", "z")
    assert res.exit_code == 0, res.output


def test_verify_reports_shape_mismatch_as_such(tmp_path):
    a = _two_output_model(tmp_path / "a.onnx")
    wide = _two_output_model(tmp_path / "wide.onnx", wide=True)
    res = _invoke("verify", a, wide)
    assert res.exit_code == 1
    assert "shape mismatch: [2, 3] vs reference [2, 5]" in res.stdout and "inf" not in res.stdout
    res = _invoke("verify", a, wide, "--json")
    y = json.loads(res.stdout)["outputs"][0]
    assert y["shape_mismatch"] is True and y["reference_shape"] == [2, 5] and y["max_abs"] is None
    assert "Infinity" not in res.stdout


def test_verify_states_the_pass_criterion(tmp_path):
    a = _two_output_model(tmp_path / "a.onnx")
    res = _invoke("verify", a, a, "--rtol", "0.001", "--atol", "0.0002")
    assert res.exit_code == 0
    assert "|a - b| <= atol + rtol * |b|" in res.stdout and "rtol=0.001" in res.stdout and "atol=0.0002" in res.stdout
    report = json.loads(_invoke("verify", a, a, "--json").stdout)
    assert "atol + rtol" in report["criterion"] and isinstance(report["outputs"], list)
    assert {"name", "shape", "max_abs", "max_rel", "mismatched", "allclose"} <= set(report["outputs"][0])


def test_verify_refuses_dim_that_is_not_symbolic(tmp_path):
    a = _two_output_model(tmp_path / "a.onnx")
    assert _invoke("verify", a, a, "--dim", "batch=3").exit_code == 0
    line = _one_error_line(_invoke("verify", a, a, "--dim", "seq=3"))
    assert "--dim seq" in line and "symbolic: batch" in line
    line = _one_error_line(_invoke("verify", a, "--save-outputs", tmp_path / "r", "--dim", "4=2"))
    assert "not a symbolic dimension" in line and not (tmp_path / "r").exists()


# -- 5. adapter paths given as files in the adapter folder ------------------------------------


@pytest.mark.parametrize("member", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_file_paths_work_everywhere(base, tmp_path, member):
    ad = write_adapter(tmp_path / "ad")
    path = ad / member
    res = _invoke("merge", base, path, "-o", tmp_path / "m.onnx", "--json")
    assert res.exit_code == 0, res.output
    res = _invoke("inject", base, path, "-o", tmp_path / "inj")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "inj" / "ad.onnx_adapter").is_file()  # named after the folder, not the file
    res = _invoke("convert", path, "--model", tmp_path / "inj" / "model.onnx", "-o", tmp_path / "c.safetensors")
    assert res.exit_code == 0, res.output
    assert _invoke("inspect", base, path).exit_code == 0
    # The folder is the adapter's input: writing over its config is refused like writing over its weights.
    line = _one_error_line(_invoke("convert", path, "--model", tmp_path / "inj" / "model.onnx", "-o", ad / member))
    assert member in line


def test_other_json_file_is_refused_in_one_line(base, tmp_path):
    ad = write_adapter(tmp_path / "ad")
    (ad / "other.json").write_text("{}")
    line = _one_error_line(_invoke("merge", base, ad / "other.json", "-o", tmp_path / "m.onnx"))
    assert "adapter_config.json" in line


# -- 6. python -m lora_export -------------------------------------------------------------------


def test_python_dash_m(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "lora_export", "--version"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "lora-export" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "lora_export", "inspect", tmp_path / "nope.onnx"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1


# -- 7. progress on a TTY only ------------------------------------------------------------------


def test_progress_only_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(_progress, "on_terminal", lambda as_json=False: not as_json)
    with _progress.progress_bar("working", as_json=True) as bar:
        assert bar is None
    with _progress.phase("exporting", as_json=True):
        pass
    assert capsys.readouterr().err == ""
    with _progress.progress_bar("working") as bar:
        assert bar is not None
        bar(0, 2, "first")
        bar(2, 2, "")
    with _progress.phase("exporting"):
        pass
    err = capsys.readouterr().err
    assert "working" in err and "exporting ..." in err


def test_no_progress_when_stderr_is_not_a_tty(base, tmp_path):
    a = write_adapter(tmp_path / "a")
    res = _invoke("inject", base, a, "-o", tmp_path / "out")
    assert res.exit_code == 0 and res.stderr == ""
    res = _invoke("merge", base, a, "-o", tmp_path / "m.onnx")
    assert res.exit_code == 0 and res.stderr == ""
    assert not _progress.on_terminal(as_json=True)

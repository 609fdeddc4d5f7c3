"""Issue 15, item 7 (code parts): what a newcomer sees in the first hour. The inject slot table is aligned,
``inspect MODEL ADAPTER`` exits 1 when nothing matched (CI can use it), and the demo prints only paths
that exist and says which error figure is which."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from polish_fixtures import REPO, one_error_line, run_cli
from robust_fixtures import IN, OUT, write_adapter, write_model

from lora_export import Adapter, LoraConfig, LoraTarget, save_adapter_files


def _adapter_on(root: Path, modules: list[str]) -> Path:
    rng = np.random.default_rng(4)
    targets = {
        m: LoraTarget(
            m,
            "linear",
            rng.standard_normal((2, IN)).astype(np.float32),
            rng.standard_normal((OUT, 2)).astype(np.float32),
            1.0,
        )  # fmt: skip
        for m in modules
    }
    save_adapter_files(Adapter(targets, LoraConfig(r=2, lora_alpha=2, target_modules=modules)), root)
    return root


def test_inject_slot_table_is_aligned(tmp_path):
    model = write_model(tmp_path / "m" / "model.onnx")
    res = run_cli("inject", model, write_adapter(tmp_path / "ad"), "-o", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "2 LoRA slots:"
    rows = lines[1:3]
    assert [r.split() for r in rows] == [["emb", "Gather", "embedding"], ["fc", "Gemm", "linear"]]
    # Every column starts at the same offset in every row.
    starts = [[m.start() for m in re.finditer(r"\S+", r)] for r in rows]
    assert starts[0] == starts[1], rows


def test_inspect_exits_1_when_nothing_matched(tmp_path):
    model = write_model(tmp_path / "model.onnx")
    unknown = _adapter_on(tmp_path / "unknown", ["not_in_model"])
    res = run_cli("inspect", model, unknown, cwd=tmp_path)
    line = one_error_line(res, code=1)
    assert "none of the 1 target(s)" in line and "unknown" in line
    assert "not_in_model" in res.stdout and "unmatched" in res.stdout  # the report still says why
    res = run_cli("inspect", model, unknown, "--json", cwd=tmp_path)
    assert res.returncode == 1 and json.loads(res.stdout)["counts"]["matched"] == 0
    # One target that lands is enough: exit 0 (with the other unmatched one reported).
    partial = _adapter_on(tmp_path / "partial", ["fc", "not_in_model"])
    res = run_cli("inspect", model, partial, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["counts"] == {"matched": 1, "absent": 0, "unmatched": 1}
    # Without an adapter there is nothing to match: exit 0.
    assert run_cli("inspect", model, cwd=tmp_path).returncode == 0


@pytest.fixture
def demo(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("lora_export_demo", REPO / "samples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lora_export_demo", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "STEPS", 2)  # the flow, not the training
    monkeypatch.setattr(module, "OUT_DIR", tmp_path / "out")
    monkeypatch.setattr(module, "CACHE_DIR", tmp_path / "out" / "adapters")
    return module


def _printed_paths(text: str, root: Path) -> list[Path]:
    return [Path(p) for p in re.findall(re.escape(str(root)) + r"[^\s'\"]*", text)]


def test_demo_prints_only_paths_that_exist(demo, tmp_path, capsys):
    torch.manual_seed(0)
    model, adapter_dir, _ = demo.trained_adapter("plus3", shift=3)
    out = capsys.readouterr().out
    paths = _printed_paths(out, tmp_path)
    assert paths, out
    assert all(p.exists() for p in paths), (out, [p for p in paths if not p.exists()])
    assert adapter_dir in paths and (adapter_dir / "adapter_config.json").is_file()
    # The second run reuses the cache and names it the same way.
    demo.trained_adapter("plus3", shift=3)
    assert all(p.exists() for p in _printed_paths(capsys.readouterr().out, tmp_path))


def test_demo_error_figures_say_which_is_which(demo):
    want = torch.tensor([[1000.0, 0.001]])
    got = np.array([[1000.0, 0.002]], np.float32)
    # Max abs error over max |logit| (one figure for the output), not verify's elementwise |a - b| / |b|.
    assert demo._rel_err(got, want) == pytest.approx(0.001 / 1000.0, rel=1e-3)
    source = (REPO / "samples" / "demo.py").read_text()
    assert "max relative error" not in source
    assert source.count("{ERROR_LABEL}") == 2 and "elementwise" in source

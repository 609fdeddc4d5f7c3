"""``lora-export build``: a recipe's merged and injected artifacts verified against PEFT, a manifest that
matches the files, byte-identical rebuilds, the content-hash cache, and refusals (exit 2, one line) and
failed verifications (exit 1, DIST untouched)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import peft_reference
from models import tiny_llama
from onnx_fixtures import export_onnx

from lora_export.cli import cli
from lora_export.runtime.session import LoraSession

RECIPE = """\
[base]
model = "base/model.onnx"

[adapters]
a1 = "adapters/a1"
a2 = "adapters/a2"

[[artifact]]
kind = "merged"
adapters = ["a1", "a2"]

[[artifact]]
kind = "injected"
adapters = ["a1", "a2"]

[verify]
inputs = "inputs.npz"
references = { a1 = "ref_a1.npz", a2 = "ref_a2.npz" }
tolerance = 1e-5
rtol = 1e-4
"""


def _peft_out(peft_model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return peft_model(**inputs).logits.numpy()


def _save_adapter(base, root: Path, name: str, seed: int):
    peft_model = peft_reference(base, seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    shutil.rmtree(root / "adapters" / name, ignore_errors=True)
    peft_model.save_pretrained(root / "adapters" / name)
    return peft_model


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A recipe folder: a tiny LLaMA (external data), two PEFT adapters, inputs and PEFT's reference outputs."""
    root = tmp_path_factory.mktemp("project")
    base, make_inputs = tiny_llama()
    (root / "base").mkdir()
    export_onnx(base, make_inputs(0), root / "base" / "model.onnx", dynamo=False, external=True)
    peft = {"a1": _save_adapter(base, root, "a1", 1), "a2": _save_adapter(base, root, "a2", 2)}
    inputs = make_inputs(3)
    np.savez(root / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    for name, model in peft.items():
        np.savez(root / f"ref_{name}.npz", out=_peft_out(model, inputs))
    (root / "recipe.toml").write_text(RECIPE)
    return root, base, make_inputs, peft


def _copy(project, tmp: Path) -> Path:
    """A private copy of the recipe folder (tests that change inputs)."""
    root = tmp / "proj"
    shutil.copytree(project[0], root, ignore=shutil.ignore_patterns("dist*", ".lora-export-cache"))
    return root


def _build(root: Path, dist: Path, *extra: str):
    return CliRunner().invoke(cli, ["build", str(root / "recipe.toml"), "-o", str(dist), *extra])


def _tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_artifacts_match_peft_and_manifest_lists_every_file(project, tmp_path):
    root, _, make_inputs, peft = project
    dist = tmp_path / "dist"
    result = _build(root, dist, "--json", "--cache", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(report["built"]) == ["injected", "merged/a1", "merged/a2"] and not report["up_to_date"]
    fresh = make_inputs(11)  # not the verification inputs
    feeds = {k: v.numpy() for k, v in fresh.items()}
    for name in ("a1", "a2"):
        merged = ort.InferenceSession(str(dist / "merged" / name / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(merged.run(None, feeds)[0], _peft_out(peft[name], fresh), rtol=1e-4, atol=1e-5)
    session = LoraSession(dist / "injected" / "model.onnx", providers=["CPUExecutionProvider"])
    for name in ("a1", "a2"):
        session.load_adapter(name, dist / "injected" / f"{name}.onnx_adapter")
        got = session.run(None, feeds, adapter=name)[0]
        np.testing.assert_allclose(got, _peft_out(peft[name], fresh), rtol=1e-4, atol=1e-5)
    manifest = json.loads((dist / "manifest.json").read_text())
    tree = _tree(dist)
    tree.pop("manifest.json")
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == tree
    assert all(manifest["files"][k]["size"] == (dist / k).stat().st_size for k in tree)
    art = {a["path"]: a for a in manifest["artifacts"]}
    assert art["merged/a1"]["provenance"]["adapters"]["a1"]["path"] == "adapters/a1"
    figures = art["injected"]["verification"]["adapters"]["a2"][0]
    assert figures["passed"] and figures["output"] == "out" and figures["max_abs"] < 1e-4
    assert manifest["versions"]["lora-export"] and "onnxruntime" in json.dumps(manifest["versions"])
    assert str(tmp_path) not in (dist / "manifest.json").read_text()  # no absolute paths


def test_two_builds_are_byte_identical(project, tmp_path):
    root = project[0]
    assert _build(root, tmp_path / "d1", "--cache", str(tmp_path / "c1")).exit_code == 0
    assert _build(root, tmp_path / "d2", "--cache", str(tmp_path / "c2")).exit_code == 0
    assert _tree(tmp_path / "d1") == _tree(tmp_path / "d2")


def test_unchanged_rebuild_is_up_to_date_and_fast(project, tmp_path):
    root = project[0]
    dist, cache = tmp_path / "dist", str(tmp_path / "cache")
    t0 = time.perf_counter()
    assert _build(root, dist, "--cache", cache).exit_code == 0
    first = time.perf_counter() - t0
    before = _tree(dist)
    t0 = time.perf_counter()
    again = _build(root, dist, "--cache", cache)
    second = time.perf_counter() - t0
    assert again.exit_code == 0 and "up to date" in again.stdout, again.output
    assert _tree(dist) == before
    assert second <= 0.5 * first, (first, second)


def test_changed_adapter_rebuilds_only_its_artifacts(project, tmp_path):
    root = _copy(project, tmp_path)
    _, base, make_inputs, _ = project
    dist, cache = tmp_path / "dist", str(tmp_path / "cache")
    assert _build(root, dist, "--cache", cache).exit_code == 0
    new_a2 = _save_adapter(base, root, "a2", 7)
    np.savez(root / "ref_a2.npz", out=_peft_out(new_a2, make_inputs(3)))
    result = _build(root, dist, "--cache", cache, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(report["built"]) == ["injected", "merged/a2"] and report["cached"] == ["merged/a1"]
    fresh = make_inputs(12)
    feeds = {k: v.numpy() for k, v in fresh.items()}
    merged = ort.InferenceSession(str(dist / "merged" / "a2" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(merged.run(None, feeds)[0], _peft_out(new_a2, fresh), rtol=1e-4, atol=1e-5)


def test_failed_verification_exits_1_and_leaves_dist(project, tmp_path):
    root = _copy(project, tmp_path)
    dist, cache = tmp_path / "dist", str(tmp_path / "cache")
    assert _build(root, dist, "--cache", cache).exit_code == 0
    before = _tree(dist)
    ref = np.load(root / "ref_a1.npz")["out"]
    np.savez(root / "ref_a1.npz", out=ref + np.random.default_rng(0).normal(0, 0.1, ref.shape).astype(np.float32))
    result = _build(root, dist, "--cache", cache)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "verification failed" in lines[0] and "a1" in lines[0] and "Traceback" not in result.output
    )
    assert _tree(dist) == before


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t + "\n[extra]\nx = 1\n", "unknown key 'extra'"),
        (lambda t: t.replace("tolerance = 1e-5", "tolerance = 1e-5\ntolerence = 2"), "unknown key 'tolerence'"),
        (lambda t: t.replace('kind = "merged"', 'kind = "merged"\nrequantise = true'), "unknown key 'requantise'"),
        (lambda t: t.replace('kind = "injected"', 'kind = "fused"'), "kind must be one of"),
        (lambda t: t.replace('adapters = ["a1", "a2"]\n\n[verify]', 'adapters = ["a3"]\n\n[verify]'), "'a3'"),
        (lambda t: t.replace("[verify]", "[verify]\n").split("[verify]")[0], "no [verify]"),
        (lambda t: t.replace("[base]", "[base"), "not valid TOML"),
    ],
)
def test_bad_recipe_is_one_line_exit_2(project, tmp_path, edit, fragment):
    root = _copy(project, tmp_path)
    (root / "recipe.toml").write_text(edit(RECIPE))
    result = _build(root, tmp_path / "dist", "--cache", str(tmp_path / "cache"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "dist").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_build(project, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = _build(project[0], tmp_path / "mine", "--cache", str(tmp_path / "cache"))
    assert result.exit_code == 2 and "not a build output" in result.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_per_row_artifact_or_one_line_refusal(project, tmp_path):
    """With ``inject --per-row`` in this version: DIST/per-row serves each row its own adapter, as PEFT
    does; without it, the kind is refused in one line."""
    from lora_export.build.steps import per_row_available

    root = _copy(project, tmp_path)
    _, _, make_inputs, peft = project
    (root / "recipe.toml").write_text(RECIPE.replace('kind = "injected"', 'kind = "per-row"'))
    result = _build(root, tmp_path / "dist", "--cache", str(tmp_path / "cache"))
    if not per_row_available():
        assert result.exit_code == 2 and "not available in this version" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        return
    assert result.exit_code == 0, result.output
    from lora_export.formats.safetensors import read_safetensors

    fresh = make_inputs(13)
    folder = tmp_path / "dist" / "per-row"
    pool, _ = read_safetensors(folder / "pool.safetensors")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in fresh.items()}
    got = session.run(None, {**feeds, **pool, "lora_adapter_ids": np.array([2, 1], np.int64)})[0]
    np.testing.assert_allclose(got[0], _peft_out(peft["a2"], fresh)[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], _peft_out(peft["a1"], fresh)[1], rtol=1e-4, atol=1e-5)


FACTORY = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make():
    torch.manual_seed(0)
    return Net().eval()


def build():
    g = torch.Generator().manual_seed(5)
    return make(), {"x": torch.randn(3, 16, generator=g)}, {"dynamo": False}
"""


def test_export_factory_base_with_references_computed_by_pytorch(tmp_path):
    """``export = "factory.py:build"``: the base exported, the references computed by the factory's model
    with the adapter attached; the merged artifact agrees with PEFT on fresh inputs."""
    import importlib.util

    root = tmp_path / "proj"
    root.mkdir()
    (root / "factory.py").write_text(FACTORY)
    spec = importlib.util.spec_from_file_location("_build_test_factory", root / "factory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    peft_model = peft_reference(module.make(), seed=4, r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
    peft_model.save_pretrained(root / "ad")
    (root / "recipe.toml").write_text(
        '[base]\nexport = "factory.py:build"\n[adapters]\nad = "ad"\n'
        '[[artifact]]\nkind = "merged"\nadapters = ["ad"]\n[[artifact]]\nkind = "injected"\nadapters = ["ad"]\n'
        "[verify]\ntolerance = 1e-5\nrtol = 1e-4\n"
    )
    result = _build(root, tmp_path / "dist", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    figures = {a["path"]: a["verification"]["adapters"]["ad"][0] for a in report["artifacts"]}
    assert figures["merged/ad"]["output"] == "output" and figures["injected"]["passed"]
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = peft_model(x).numpy()
    merged = ort.InferenceSession(str(tmp_path / "dist/merged/ad/model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(merged.run(None, {"x": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)
    again = _build(root, tmp_path / "dist")
    assert again.exit_code == 0 and "up to date" in again.stdout, again.output


def test_progress_on_a_terminal_only(project, tmp_path, monkeypatch):
    """On a terminal each step shows "building merged/a1 ..." on stderr (then erased); off one, nothing."""
    from lora_export.cli import _progress

    root = project[0]
    quiet = _build(root, tmp_path / "d1", "--cache", str(tmp_path / "c"))
    assert quiet.exit_code == 0 and quiet.stderr == ""
    monkeypatch.setattr(_progress, "on_terminal", lambda as_json=False: not as_json)
    shown = _build(root, tmp_path / "d2", "--cache", str(tmp_path / "c2"))
    assert shown.exit_code == 0, shown.output
    assert "building merged/a1 ..." in shown.stderr and "verifying injected ..." in shown.stderr
    assert shown.stderr.endswith("\r")  # each line is erased (click drops the escape code off a terminal)


def test_a_changed_dist_file_is_restored_not_reported_up_to_date(project, tmp_path):
    root = project[0]
    dist, cache = tmp_path / "dist", str(tmp_path / "cache")
    assert _build(root, dist, "--cache", cache).exit_code == 0
    before = _tree(dist)
    target = dist / "injected" / "a1.onnx_adapter"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.unlink()  # a new file: the cache's hard-linked copy keeps its bytes
    target.write_bytes(bytes(data))
    again = _build(root, dist, "--cache", cache)
    assert again.exit_code == 0 and "up to date" not in again.stdout, again.output
    assert _tree(dist) == before


def test_a_changed_module_of_the_factory_rebuilds_the_base(tmp_path):
    """The factory imports its seed from another module: editing that module (not the factory file) must
    rebuild, and the merged artifact must follow the new weights, never a cached export of the old ones."""
    import importlib.util
    import sys

    root = tmp_path / "proj"
    root.mkdir()
    (root / "factory.py").write_text(
        FACTORY.replace("torch.manual_seed(0)", "from weights_seed import SEED\n\n    torch.manual_seed(SEED)")
    )
    (root / "weights_seed.py").write_text("SEED = 0\n")
    (root / "recipe.toml").write_text(
        '[base]\nexport = "factory.py:build"\n[adapters]\nad = "ad"\n'
        '[[artifact]]\nkind = "merged"\nadapters = ["ad"]\n[verify]\ntolerance = 1e-5\nrtol = 1e-4\n'
    )

    def peft_on_current_base():
        sys.modules.pop("weights_seed", None)  # each CLI run is a fresh process; this test runs in one
        sys.path.insert(0, str(root))
        try:
            spec = importlib.util.spec_from_file_location("_build_test_factory2", root / "factory.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return peft_reference(module.make(), seed=4, r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
        finally:
            sys.path.remove(str(root))
            sys.modules.pop("weights_seed", None)

    first = peft_on_current_base()
    first.save_pretrained(root / "ad")
    assert _build(root, tmp_path / "dist").exit_code == 0
    (root / "weights_seed.py").write_text("SEED = 1\n")
    second = peft_on_current_base()
    again = _build(root, tmp_path / "dist")
    assert again.exit_code == 0, again.output
    assert "up to date" not in again.stdout
    x = torch.randn(4, 16)
    with torch.no_grad():
        old, new = first(x).numpy(), second(x).numpy()
    merged = ort.InferenceSession(str(tmp_path / "dist/merged/ad/model.onnx"), providers=["CPUExecutionProvider"])
    got = merged.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, new, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, old, rtol=1e-4, atol=1e-5)

"""``lora-export merge`` through the CLI: reports, and every refusal as exit 2 with one line, no
traceback, nothing written, inputs unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import peft_reference
from models import tiny_llama
from onnx_fixtures import export_onnx, file_hashes

from lora_export import Adapter, LoraConfig, LoraTarget, save_adapter_files
from lora_export.cli import cli
from lora_export.formats.safetensors import read_safetensors, write_safetensors


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaMA exported with external data, and a PEFT adapter on q_proj/v_proj."""
    root = tmp_path_factory.mktemp("cli")
    base, make_inputs = tiny_llama()
    (root / "base").mkdir()
    onnx_path = export_onnx(base, make_inputs(0), root / "base" / "model.onnx", dynamo=False, external=True)
    peft_model = peft_reference(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model.save_pretrained(root / "adapter")
    return root, onnx_path, root / "adapter"


def _invoke(*args):
    return CliRunner().invoke(cli, ["merge", *map(str, args)])


def test_json_report(setup, tmp_path):
    root, onnx_path, adapter = setup
    result = _invoke(onnx_path, adapter, "-o", tmp_path / "m.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"]["matched"] == 4 and report["counts"]["merged_weights"] == 4
    first = report["targets"][0]
    assert first["status"] == "matched" and first["strategy"] == "node-name" and first["layout"].startswith("MatMul")
    assert {"load", "resolve", "merge", "save", "total"} <= set(report["timings_s"])
    names = [Path(f).name for f in report["files"]]
    assert names[-1] == "m.onnx" and len(names) == 2 and names[0].startswith("m.onnx.") and names[0].endswith(".data")


def test_human_summary(setup, tmp_path):
    _, onnx_path, adapter = setup
    result = _invoke(onnx_path, adapter, "-o", tmp_path / "m.onnx", "--scale", "0.5")
    assert result.exit_code == 0, result.output
    assert "merged 4 weight(s) from 4 target(s)" in result.stdout
    assert "model.layers.0.self_attn.q_proj" in result.stdout


def _fake_adapter(directory: Path, name: str, inp: int = 32, nan: bool = False) -> Path:
    a = np.full((2, inp), np.nan if nan else 0.1, np.float32)
    t = LoraTarget(name, "linear", a, np.ones((32, 2), np.float32), 1.0)
    save_adapter_files(Adapter({name: t}, LoraConfig(r=2, target_modules=["q_proj"])), directory)
    return directory


def _broken(kind: str, setup, tmp: Path) -> tuple[list, str]:
    """Arguments for a failing merge and a fragment of the expected one-line error."""
    root, onnx_path, adapter = setup
    out = tmp / "out.onnx"
    if kind == "out-is-base":
        return [onnx_path, adapter, "-o", onnx_path], "overwrite"
    if kind == "out-is-data":
        return [onnx_path, adapter, "-o", onnx_path.parent / "model.onnx.data"], "overwrite"
    if kind == "other-model":
        return [onnx_path, _fake_adapter(tmp / "ad", "encoder.layer.0.attention.self.query"), "-o", out], "another"
    if kind == "shape":
        return [onnx_path, _fake_adapter(tmp / "ad", "model.layers.0.self_attn.q_proj", inp=16), "-o", out], "shape"
    if kind == "nan":
        return [onnx_path, _fake_adapter(tmp / "ad", "model.layers.0.self_attn.q_proj", nan=True), "-o", out], "NaN"
    if kind == "unmatched":
        ad = tmp / "ad"
        shutil.copytree(adapter, ad)
        tensors = dict(read_safetensors(ad / "adapter_model.safetensors")[0])
        for k in list(tensors):
            if "layers.1.self_attn.v_proj" in k:
                tensors[k.replace("self_attn.v_proj", "self_attn")] = np.array(tensors.pop(k))
        write_safetensors(ad / "adapter_model.safetensors", {k: np.array(v) for k, v in tensors.items()})
        return [onnx_path, ad, "-o", out], "allow-partial"
    if kind in ("no-config", "bad-config", "bad-safetensors"):
        ad = tmp / "ad"
        shutil.copytree(adapter, ad)
        if kind == "no-config":
            (ad / "adapter_config.json").unlink()
        elif kind == "bad-config":
            (ad / "adapter_config.json").write_text("{not json")
        else:
            data = (ad / "adapter_model.safetensors").read_bytes()
            (ad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        return [onnx_path, ad, "-o", out], {"no-config": "adapter_config", "bad-config": "JSON"}.get(
            kind, "safetensors"
        )
    if kind == "truncated-onnx":
        bad = tmp / "bad.onnx"
        bad.write_bytes(onnx_path.read_bytes()[:200])
        return [bad, adapter, "-o", out], "ONNX"
    if kind == "missing-data":
        shutil.copy(onnx_path, tmp / "model.onnx")
        return [tmp / "model.onnx", adapter, "-o", out], "missing"
    if kind == "data-outside":
        proto = onnx.load(str(onnx_path), load_external_data=False)
        for init in proto.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = "../model.onnx.data"
        (tmp / "inner").mkdir()
        onnx.save(proto, str(tmp / "inner" / "evil.onnx"))
        shutil.copy(onnx_path.parent / "model.onnx.data", tmp / "model.onnx.data")
        return [tmp / "inner" / "evil.onnx", adapter, "-o", out], "outside"
    if kind == "nan-scale":
        return [onnx_path, adapter, "-o", out, "--scale", "nan"], "finite"
    raise AssertionError(kind)


ERRORS = [
    "out-is-base",
    "out-is-data",
    "other-model",
    "shape",
    "nan",
    "unmatched",
    "no-config",
    "bad-config",
    "bad-safetensors",
    "truncated-onnx",
    "missing-data",
    "data-outside",
    "nan-scale",
]


@pytest.mark.parametrize("kind", ERRORS)
def test_errors(setup, tmp_path, kind):
    args, fragment = _broken(kind, setup, tmp_path)
    root = setup[0]
    inputs_before = file_hashes(root, tmp_path)
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment.lower() in lines[0].lower()
    assert "Traceback" not in result.output
    assert file_hashes(root, tmp_path) == inputs_before  # nothing written, nothing changed


def test_allow_partial(setup, tmp_path):
    args, _ = _broken("unmatched", setup, tmp_path)
    result = _invoke(*args, "--allow-partial", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["counts"]["unmatched"] == 1 and report["counts"]["merged_weights"] == 3

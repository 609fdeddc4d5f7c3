"""inspect: the targetable weights of a model (metadata only) and how an adapter's targets resolve."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import lora_export
from lora_export.cli import cli
from lora_export.graph.verbs.inspect import inspect_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 8)
        self.out = nn.Linear(8, 4, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.out(torch.relu(self.fc(h)))


MODULES = {"emb", "conv", "fc", "out"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lora_export import LoraConfig, attach_lora, save_adapter
    from lora_export.formats.safetensors import write_safetensors

    root = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    net = Net().eval()
    ids = torch.randint(0, 100, (2, 8))
    with_manifest = lora_export.export(net, (ids,), root / "net.onnx", dynamo=False, input_names=["ids"])
    # An anonymous export: no manifest, MatMul weights named onnx::MatMul_*.
    plain = root / "plain.onnx"
    torch.onnx.export(net, (ids,), str(plain), dynamo=False, input_names=["ids"])
    external = lora_export.export(net, (ids,), root / "ext" / "net.onnx", dynamo=False, external_data=True)
    write_safetensors(root / "base.safetensors", {k: v.numpy() for k, v in net.state_dict().items()})
    lora = attach_lora(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=sorted(MODULES)), verbose=False)
    save_adapter(lora, root / "adapter")
    return {
        "manifest": with_manifest,
        "plain": plain,
        "external": external,
        "base": root / "base.safetensors",
        "adapter": root / "adapter",
    }


def test_lists_targets_with_module_paths_from_manifest(files):
    report = inspect_model(files["manifest"])
    rows = {r["module"]: r for r in report["targetable"]}
    assert report["manifest"] is True and set(rows) == MODULES
    assert all(r["module_source"] == "manifest" for r in rows.values())
    assert rows["fc"]["op"] == "MatMul" and rows["fc"]["shape"] == [8, 16] and rows["fc"]["dtype"] == "float"
    assert rows["emb"]["kind"] == "embedding" and rows["emb"]["shape"] == [100, 16]
    assert rows["conv"]["kind"] == "conv" and rows["conv"]["shape"] == [16, 16, 3]
    assert "Wᵀ" in rows["out"]["layout"]


def test_without_manifest_paths_come_from_names(files):
    rows = {r["module"]: r for r in inspect_model(files["plain"])["targetable"]}
    assert set(rows) == MODULES
    assert rows["emb"]["module_source"] == "initializer-name"
    assert rows["fc"]["module_source"] == "node-name/scope" and rows["fc"]["initializer"].startswith("onnx::")


def test_reads_no_tensor_data(files, monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(ir.ExternalTensor, "numpy", refuse)
    monkeypatch.setattr(ir.ExternalTensor, "tobytes", refuse)
    report = inspect_model(files["external"])
    assert len(report["targetable"]) == 4


def test_with_adapter_resolves_every_target(files):
    report = inspect_model(files["manifest"], files["adapter"])
    assert report["counts"] == {"matched": 4, "absent": 0, "unmatched": 0}
    assert {r["strategy"] for r in report["resolution"]} == {"manifest"}
    plain = inspect_model(files["plain"], files["adapter"])
    assert plain["counts"]["matched"] == 4
    assert {r["strategy"] for r in plain["resolution"]} <= {"initializer-name", "node-name", "scope"}
    fingerprinted = inspect_model(files["plain"], files["adapter"], base_weights=files["base"])
    assert fingerprinted["counts"]["matched"] == 4


def test_cli_table_and_json(files):
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", str(files["manifest"])])
    assert res.exit_code == 0, res.output
    assert "4 targetable weight(s)" in res.stdout and "MatMul" in res.stdout and "fc" in res.stdout
    res = runner.invoke(cli, ["inspect", str(files["plain"]), str(files["adapter"])])
    assert res.exit_code == 0, res.output
    assert "4 matched, 0 absent, 0 unmatched" in res.stdout
    res = runner.invoke(cli, ["inspect", str(files["manifest"]), str(files["adapter"]), "--json"])
    data = json.loads(res.stdout)
    assert len(data["targetable"]) == 4 and data["counts"]["matched"] == 4


@pytest.mark.parametrize("case", ["missing_model", "base_without_adapter", "missing_adapter"])
def test_cli_errors(files, tmp_path, case):
    args = {
        "missing_model": [str(tmp_path / "nope.onnx")],
        "base_without_adapter": [str(files["manifest"]), "--base-weights", str(files["base"])],
        "missing_adapter": [str(files["manifest"]), str(tmp_path / "no_adapter")],
    }[case]
    res = CliRunner().invoke(cli, ["inspect", *args])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1

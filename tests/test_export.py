"""torch → ONNX export: outputs match PyTorch, the manifest points at the exact weights, the caller's model
is untouched, LoRA wrappers are exported as their base, and the CLI reports errors in one line."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from models import conv_embed_net, tiny_bert, tiny_gpt2
from onnx import numpy_helper
from torch import nn

import lora_export
from lora_export.cli import cli
from lora_export.errors import LoraExportError
from lora_export.exporting.exporter import MANIFEST_KEY, export_with_manifest


class MLP(nn.Module):
    """Linear with and without bias, Conv1d and Embedding; nothing an exporter would fold."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 16)
        self.out = nn.Linear(16, 8, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.out(torch.relu(self.fc(h)))


def _mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, {"ids": ids}


def _reference(model: nn.Module, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**inputs)
    return (out if isinstance(out, torch.Tensor) else out[0]).numpy()


def _run_onnx(path, inputs: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})[0]


def _check_manifest(path, model: nn.Module, allowed_unmapped: set[str] = frozenset()) -> dict:
    """Independently of the exporter's code: each manifest entry names an initializer equal to W or Wᵀ."""
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    manifest = json.loads(meta[MANIFEST_KEY])
    assert manifest["version"] == 1
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
    from transformers.pytorch_utils import Conv1D

    targetable = {n for n, m in model.named_modules() if isinstance(m, (*kinds, Conv1D))}
    assert set(manifest["modules"]) <= targetable
    assert targetable - set(manifest["modules"]) <= set(allowed_unmapped)
    for name, entry in manifest["modules"].items():
        w = model.get_submodule(name).weight.detach().numpy()
        stored = inits[entry["initializer"]]
        assert np.array_equal(stored, w) or (w.ndim == 2 and np.array_equal(stored, w.T)), name
        node = nodes[entry["node"]]
        assert node.op_type == entry["op_type"]
        assert entry["initializer"] in node.input or entry["op_type"] == "MatMul", name
        assert entry["layout"]
    return manifest


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("builder", [_mlp, conv_embed_net], ids=["mlp", "conv_embed"])
def test_export_matches_torch_and_manifest_is_exact(tmp_path, builder, dynamo):
    model, make = builder()
    inputs = make if isinstance(make, dict) else make(0)
    expected = _reference(model, inputs)
    path = lora_export.export(model, inputs, tmp_path / "m.onnx", dynamo=dynamo)
    assert path == tmp_path / "m.onnx" and path.is_file()
    np.testing.assert_allclose(_run_onnx(path, inputs), expected, rtol=1e-5, atol=1e-6)
    manifest = _check_manifest(path, model)
    assert len(manifest["modules"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("builder", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_export_transformers_dynamo(tmp_path, builder):
    model, make = builder()
    inputs = make(0)
    expected = _reference(model, inputs)
    result = export_with_manifest(model, inputs, tmp_path / "m.onnx")
    np.testing.assert_allclose(_run_onnx(result.path, inputs), expected, rtol=1e-4, atol=1e-5)
    # Position tables are indexed by constants with static shapes, so the exporter folds them away.
    folded = {"embeddings.position_embeddings", "transformer.wpe"}
    _check_manifest(result.path, model, allowed_unmapped=folded)
    assert set(result.unmapped) <= folded
    if builder is tiny_gpt2:
        # GPT-2's Conv1D stores Wᵀ; lm_head is tied to wte and still gets its own entry.
        assert {"transformer.h.0.attn.c_attn", "lm_head", "transformer.wte"} <= set(result.manifest["modules"])


def test_export_leaves_callers_model_untouched(tmp_path):
    model, inputs = _mlp()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    for dynamo in (False, True):
        lora_export.export(model, inputs, tmp_path / f"m{dynamo}.onnx", dynamo=dynamo)
        assert model.training
        assert all(m.training for m in model.modules())
        assert {n: type(m) for n, m in model.named_modules()} == types
        after = model.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_is_deterministic(tmp_path):
    model, inputs = _mlp()
    a = lora_export.export(model, inputs, tmp_path / "a.onnx", dynamo=False)
    b = lora_export.export(model, inputs, tmp_path / "b.onnx", dynamo=False)
    assert a.read_bytes() == b.read_bytes()


def test_export_with_lora_attached_exports_the_base(tmp_path):
    from models import randomize_lora

    from lora_export import LoraConfig, attach_lora, merge_lora

    base, make = conv_embed_net()
    inputs = make(0)
    expected_base = _reference(base, inputs)
    model = attach_lora(base, LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "head", "emb"]), verbose=False)
    randomize_lora(model)
    merge_lora(model)  # merged state must be undone in the copy, not in the caller's model
    with_lora = _reference(model, inputs)
    assert not np.allclose(with_lora, expected_base, atol=1e-4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}

    path = lora_export.export(model, inputs, tmp_path / "base.onnx")
    np.testing.assert_allclose(_run_onnx(path, inputs), expected_base, rtol=1e-5, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    manifest = json.loads(meta[MANIFEST_KEY])
    assert {"emb", "conv", "gconv", "head"} == set(manifest["modules"])
    # The caller still holds its merged LoRA model.
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    np.testing.assert_array_equal(_reference(model, inputs), with_lora)


def test_export_errors_are_one_line(tmp_path):
    model, inputs = _mlp()
    with pytest.raises(LoraExportError, match="example inputs"):
        lora_export.export(model, 3, tmp_path / "m.onnx")
    with pytest.raises(LoraExportError, match="export failed") as err:
        lora_export.export(model, {"wrong": inputs["ids"]}, tmp_path / "m.onnx", dynamo=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


# -- CLI ---------------------------------------------------------------------------------------


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def build():
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), (torch.randn(2, 4),)

            def with_kwargs():
                model, inputs = build()
                return model, inputs, {"input_names": ["x"], "output_names": ["y"]}

            def broken():
                raise RuntimeError("no weights here")
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_export(factory_dir):
    runner = CliRunner()
    res = runner.invoke(cli, ["export", "my_models:with_kwargs", "out.onnx", "--torchscript", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["exporter"] == "torchscript" and report["mapped"] == 2 and report["unmapped"] == []
    sess = ort.InferenceSession(str(factory_dir / "out.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"] and [o.name for o in sess.get_outputs()] == ["y"]

    res = runner.invoke(cli, ["export", "my_models:build", "dyn.onnx"])
    assert res.exit_code == 0, res.output
    assert "2 module(s) mapped" in res.stdout


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "MODULE:FUNCTION"),
        ("missing_module:f", "cannot import"),
        ("my_models:nope", "no attribute"),
        ("my_models:broken", "no weights here"),
    ],
)
def test_cli_export_errors(factory_dir, spec, message):
    res = CliRunner().invoke(cli, ["export", spec, "out.onnx"])
    assert res.exit_code == 2
    assert message in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert not (factory_dir / "out.onnx").exists()

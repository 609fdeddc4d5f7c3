"""What our own export drops, an adapter can no longer reach: the dynamo export keeps every weight an adapter
may replace (a fresh head's all-zero bias, equal tensors), so PEFT's ``modules_to_save`` merges exactly; and
``--allow-partial`` is offered as the way forward only when skipping changes nothing."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import peft_reference
from torch import nn

from lora_export import Adapter, LoraConfig, LoraTarget, merge_adapter
from lora_export.cli import cli
from lora_export.errors import TargetError
from lora_export.exporting.exporter import export_with_manifest
from lora_export.exporting.keep import foldable_parameters

CPU = ["CPUExecutionProvider"]


def bert_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def token_inputs(batch: int, seq: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """BERT with a fresh (all-zero bias) classifier, exported by dynamo; a PEFT adapter that trains the head."""
    root = tmp_path_factory.mktemp("head")
    base = bert_classifier()
    assert not base.classifier.bias.any()  # the case: a fresh head's bias is all zeros
    result = export_with_manifest(base, token_inputs(2, 7, 0), root / "base.onnx")
    peft_model = peft_reference(
        base, seed=3, r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    with torch.no_grad():  # a trained head: weight and bias differ from the base's
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(root / "adapter"))
    return root, result, peft_model


def test_dynamo_export_keeps_the_zero_bias(head):
    _, result, _ = head
    proto = onnx.load(str(result.path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert "classifier.bias" in inits and not inits["classifier.bias"].any()
    assert any("classifier.bias" in n.input for n in proto.graph.node)
    # Every zero bias stays its own tensor: none merged into another's initializer.
    base = bert_classifier()
    for name in ("bert.encoder.layer.0.attention.self.query.bias", "bert.encoder.layer.1.output.dense.bias"):
        assert name in inits and np.array_equal(inits[name], base.get_submodule(name[:-5]).bias.detach().numpy())


def test_modules_to_save_head_merges_exactly(head):
    root, result, peft_model = head
    out = root / "merged.onnx"
    res = CliRunner().invoke(cli, ["merge", str(result.path), str(root / "adapter"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "classifier.bias" in res.stdout
    sess = ort.InferenceSession(str(out), providers=CPU)
    for i, (batch, seq) in enumerate([(3, 9), (1, 4)]):
        inputs = token_inputs(batch, seq, 40 + i)
        with torch.no_grad():
            expected = peft_model(**inputs).logits.numpy()
        got = sess.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_missing_head_tensor_is_not_skipped_on_a_hint(head, tmp_path):
    """A graph without the bias (what the optimizer made of it before): merge refuses, and its message does
    not send the user to --allow-partial as if it were harmless: it says what skipping costs."""
    root, result, _ = head
    proto = onnx.load(str(result.path))
    for node in proto.graph.node:
        if node.op_type == "Gemm" and "classifier.bias" in node.input:
            del node.input[2]
    kept = [t for t in proto.graph.initializer if t.name != "classifier.bias"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    folded = tmp_path / "folded.onnx"
    onnx.save(proto, str(folded))
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    res = CliRunner().invoke(cli, ["merge", str(folded), str(adapter), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2, res.output
    message = res.stderr.strip()
    assert "\n" not in message and "classifier.bias" in message
    assert "folded it away" in message and "lora-export export" in message
    assert "would not compute what the adapter's model computes" in message
    assert "use --allow-partial to merge the rest" not in message
    assert not (tmp_path / "m.onnx").exists()


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x))


def _target(name: str, zero_b: bool) -> LoraTarget:
    rng = np.random.default_rng(1)
    b = np.zeros((4, 2), np.float32) if zero_b else rng.standard_normal((4, 2)).astype(np.float32)
    return LoraTarget(name, "linear", rng.standard_normal((2, 4)).astype(np.float32), b, 0.5)


@pytest.mark.parametrize("zero_b", [True, False], ids=["inert", "needed"])
def test_allow_partial_offered_only_when_skipping_is_exact(tmp_path, zero_b):
    import onnx_ir as ir

    torch.manual_seed(0)
    path = export_with_manifest(Two().eval(), (torch.randn(2, 4),), tmp_path / "t.onnx", dynamo=False).path
    adapter = Adapter({t.name: t for t in (_target("a", False), _target("elsewhere", zero_b))}, LoraConfig(r=2))
    with pytest.raises(TargetError) as e:
        merge_adapter(ir.load(str(path)), adapter)
    if zero_b:
        assert "their deltas are zero, so --allow-partial merges the rest exactly" in str(e.value)
    else:
        assert "would not compute what the adapter's model computes" in str(e.value)
        assert "merges the rest exactly" not in str(e.value)


def test_foldable_parameters_are_uniform_or_duplicated_not_tied():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        model[0].bias.zero_()  # uniform
        model[2].weight.fill_(1.0)  # uniform
        model[1].weight.copy_(model[3].weight)  # equal values, two tensors
    model[3].bias = model[1].bias  # tied: one tensor, sharing its initializer is right
    found = foldable_parameters(model)
    assert found == {"0.bias", "2.weight", "1.weight", "3.weight"}


def test_static_export_keeps_the_position_table(tmp_path):
    """Static shapes read GPT-2's ``wpe`` at constant positions; the table stays, mapped, so LoRA can reach it."""
    from models import tiny_gpt2

    model, make = tiny_gpt2()
    result = export_with_manifest(model, make(0), tmp_path / "g.onnx", dynamic=False)
    assert result.unmapped == [] and "transformer.wpe" in result.manifest["modules"]
    inputs = make(11)
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    sess = ort.InferenceSession(str(result.path), providers=CPU)
    np.testing.assert_allclose(
        sess.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0], expected, rtol=1e-4, atol=1e-5
    )

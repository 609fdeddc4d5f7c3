"""Encoder-decoder export is right, or refused: an encoder's and a decoder's lengths are two dimensions,
named apart and checked apart, and the exported T5 and BART compute what PyTorch computes at unequal
lengths. A model that returns a KV cache is refused up front, in one line that says what to do."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lora_export.cli import cli
from lora_export.errors import LoraExportError
from lora_export.exporting.exporter import export_with_manifest
from lora_export.exporting.shapes import InputSpec, grown, propose_axes

CPU = ["CPUExecutionProvider"]
VOCAB = 100
# (batch, encoder length, decoder length): none equal to the export example's (2, 5, 5), lengths unequal.
SHAPES = [(3, 4, 6), (1, 9, 2), (2, 3, 8)]


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return BartForConditionalGeneration(cfg).eval()


class Logits(nn.Module):
    """The issue's wrapper: a seq2seq model returning its logits only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
        return out.logits


def seq2seq_inputs(batch: int, enc: int, dec: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, enc, dtype=torch.long)
    mask[0, -1:] = 0  # padding in one row exercises the mask
    return {
        "input_ids": torch.randint(1, VOCAB, (batch, enc), generator=g),
        "attention_mask": mask,
        "decoder_input_ids": torch.randint(1, VOCAB, (batch, dec), generator=g),
    }


def torch_logits(model: nn.Module, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**inputs, **({"use_cache": False} if not isinstance(model, Logits) else {}))
    return (out if isinstance(out, torch.Tensor) else out.logits).numpy()


def assert_serves_unequal_lengths(path, model: nn.Module) -> None:
    sess = ort.InferenceSession(str(path), providers=CPU)
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    # The encoder's and the decoder's length are two dimensions, and the graph says so.
    assert shapes["input_ids"][1] == shapes["attention_mask"][1] == "sequence"
    assert shapes["decoder_input_ids"][1] == "decoder_sequence"
    out_name = sess.get_outputs()[0].name
    # An output's length is named after the input length it follows: the logits follow the decoder.
    assert sess.get_outputs()[0].shape == ["batch", "decoder_sequence", VOCAB]
    for i, (batch, enc, dec) in enumerate(SHAPES):
        inputs = seq2seq_inputs(batch, enc, dec, 100 + i)
        got = sess.run([out_name], {k: v.numpy() for k, v in inputs.items()})[0]
        expected = torch_logits(model, inputs)
        assert got.shape == expected.shape == (batch, dec, VOCAB)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def t5_cli(tmp_path_factory):
    """The unwrapped T5ForConditionalGeneration through the CLI (dynamo), as the issue tried it."""
    folder = tmp_path_factory.mktemp("t5")
    (folder / "t5_factory.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from test_export_seq2seq import tiny_t5, seq2seq_inputs\n"
        "def build():\n"
        "    return tiny_t5(), seq2seq_inputs(2, 5, 5, 0)\n"
    )
    out = folder / "t5.onnx"
    res = CliRunner().invoke(cli, ["export", f"{folder / 't5_factory.py'}:build", str(out)])
    return res, out


def test_unwrapped_t5_exports_without_its_cache(t5_cli):
    res, out = t5_cli
    assert res.exit_code == 0, res.output
    assert "outputs: logits, encoder_last_hidden_state" in res.stdout
    assert "decoder_input_ids[1]=decoder_sequence" in res.stdout and "input_ids[1]=sequence" in res.stdout
    assert_serves_unequal_lengths(out, tiny_t5())


@pytest.mark.parametrize(
    ("build", "dynamo"),
    [
        pytest.param(lambda: Logits(tiny_t5()), False, id="t5-logits-torchscript"),
        pytest.param(tiny_bart, False, id="bart-torchscript"),
        # The dynamo path is covered by the unwrapped T5 above; a second dynamo export costs ~15 s.
        pytest.param(tiny_bart, True, id="bart-dynamo", marks=pytest.mark.slow),
    ],
)
def test_seq2seq_serves_unequal_lengths(tmp_path, build, dynamo):
    model = build()
    result = export_with_manifest(model, seq2seq_inputs(2, 5, 5, 0), tmp_path / "m.onnx", dynamo=dynamo)
    assert result.dynamic_axes["decoder_input_ids"] == {0: "batch", 1: "decoder_sequence"}
    assert result.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    assert_serves_unequal_lengths(result.path, model)


class Paired(nn.Module):
    """Two token inputs of names we know nothing of; ``tied`` adds them position by position."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.tied = tied
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, src, tgt):
        a, b = self.emb(src), self.emb(tgt)
        if self.tied:
            return self.fc(a + b)
        return self.fc(b + a.mean(1, keepdim=True))


@pytest.mark.parametrize("tied", [False, True], ids=["independent", "tied"])
def test_unknown_token_inputs_get_their_own_length_unless_tied(tmp_path, tied):
    torch.manual_seed(0)
    model = Paired(tied).eval()
    g = torch.Generator().manual_seed(1)
    example = {"src": torch.randint(0, 20, (2, 5), generator=g), "tgt": torch.randint(0, 20, (2, 5), generator=g)}
    result = export_with_manifest(model, example, tmp_path / "p.onnx", dynamo=False)
    if tied:  # the model cannot take two lengths: one name
        assert result.dynamic_axes == {"src": {0: "batch", 1: "sequence"}, "tgt": {0: "batch", 1: "sequence"}}
        lengths = [(4, 4), (9, 9)]
    else:
        assert result.dynamic_axes == {"src": {0: "batch", 1: "src_sequence"}, "tgt": {0: "batch", 1: "tgt_sequence"}}
        lengths = [(3, 7), (8, 2)]
    sess = ort.InferenceSession(str(result.path), providers=CPU)
    for i, (ls, lt) in enumerate(lengths):
        g = torch.Generator().manual_seed(10 + i)
        feeds = {"src": torch.randint(0, 20, (3, ls), generator=g), "tgt": torch.randint(0, 20, (3, lt), generator=g)}
        with torch.no_grad():
            expected = model(**feeds).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_shape_check_grows_each_named_dimension_by_its_own_amount():
    g = torch.Generator().manual_seed(2)
    specs = [
        InputSpec(n, n, torch.randint(0, 9, (2, 5), generator=g))
        for n in ("input_ids", "attention_mask", "decoder_input_ids")
    ]
    propose_axes(specs)
    axes = {s.name: dict(s.axes) for s in specs}
    _, _, tensors = grown((), {s.name: s.tensor for s in specs}, specs, axes)
    enc, mask, dec = (tensors[n].shape for n in ("input_ids", "attention_mask", "decoder_input_ids"))
    assert enc == mask and enc[0] == dec[0] > 2
    assert enc[1] != dec[1] and min(enc[1], dec[1]) > 5
    # Values are the example's, repeated along the grown axis (not zeros).
    assert torch.equal(tensors["decoder_input_ids"][:2, :5], specs[2].tensor)


class Cached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        from transformers import DynamicCache

        return {"logits": self.fc(x), "past_key_values": DynamicCache()}


def test_a_cache_output_is_refused_up_front_in_one_complete_line(tmp_path):
    with pytest.raises(LoraExportError) as e:
        export_with_manifest(Cached(), (torch.randn(2, 4),), tmp_path / "c.onnx")
    message = str(e.value)
    assert "\n" not in message and "DynamicCache (past_key_values)" in message
    assert message.endswith("(e.g. the logits)") and "use_cache=False" in message
    assert not list(tmp_path.iterdir())

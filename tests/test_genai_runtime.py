"""onnxruntime-genai: the builder's model folder, injected or converted for, runs with ``og.Adapters``.

A tiny LLaMA (random init, a tokenizer trained offline) goes through onnxruntime-genai's builder. Then:
- ``inject`` into another folder copies genai_config.json (pointed at our model.onnx) and the tokenizer files;
  ``og.Model(folder)`` + ``og.Adapters`` + ``set_active_adapter`` give PEFT's logits, no adapter the base's;
- the builder's own LoRA model (``adapter_path=``), with its LoRA weights made inputs as Olive's
  ExtractAdapters does, takes an adapter of another rank and alpha written by ``convert``.
Skipped where onnxruntime-genai is not installed (``pip install onnxruntime-genai``, or ``-cuda`` beside
onnxruntime-gpu).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import saved_peft_reference
from onnx import numpy_helper

og = pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnxruntime_genai.models.builder")

from lora_export import LoraSession, convert_adapter  # noqa: E402
from lora_export.graph.verbs.convert import read_manifest  # noqa: E402
from lora_export.graph.verbs.inject import inject_files  # noqa: E402

TOL = 1e-5
VOCAB = 256  # not 128: with vocab_size == intermediate_size the genai builder (0.18) writes a wrong model


def _tokenizer(path) -> None:
    import random

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = [" ".join("".join(rng.choice("abcdefgh") for _ in range(4)) for _ in range(8)) for _ in range(40)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        words, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(path)


def _build(hf, out, cache, adapter=None, precision: str = "fp32", options: tuple[str, ...] = ()) -> None:
    """The builder on the Hugging Face folder ``hf``; ``options``: its --extra_options KEY=VALUE."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(cache)]
    options = (*options, f"adapter_path={adapter}") if adapter is not None else options
    if options:
        cmd += ["--extra_options", *options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.fixture(scope="module")
def genai(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("genai")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "hf")
    _tokenizer(root / "hf")
    first = saved_peft_reference(base, root / "first", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    other = saved_peft_reference(base, root / "other", seed=5, r=6, lora_alpha=20, target_modules=["q_proj", "v_proj"])
    ids = torch.randint(4, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        refs = {n: m(input_ids=ids).logits.numpy() for n, m in (("first", first), ("other", other), ("base", base))}
    weights = {k: v.detach().numpy() for k, v in base.state_dict().items()}
    return root, ids.numpy(), refs, weights


def _logits(folder, ids, adapter_file=None) -> np.ndarray:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=32)
    gen = og.Generator(model, params)
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "a")
        gen.set_active_adapter(adapters, "a")
    gen.append_tokens(ids)
    return np.asarray(gen.get_output("logits")).reshape(ids.shape[0], ids.shape[1], -1)


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_inject_into_a_genai_folder_runs_with_og_adapters(genai, tmp_path):
    root, ids, refs, weights = genai
    _build(root / "hf", tmp_path / "built", tmp_path / "cache")
    # A decoder named otherwise than model.onnx: the copied genai_config.json must follow the rename.
    src = tmp_path / "src"
    shutil.copytree(tmp_path / "built", src)
    (src / "model.onnx").rename(src / "decoder.onnx")
    cfg = json.loads((src / "genai_config.json").read_text())
    cfg["model"]["decoder"]["filename"] = "decoder.onnx"
    (src / "genai_config.json").write_text(json.dumps(cfg))
    assert _rel(_logits(src, ids), refs["base"]) <= TOL  # the builder's model is exact here

    out = tmp_path / "served"
    # The builder packs q/k/v into one MatMul: those targets resolve by value (--base-weights).
    inject_files(src / "decoder.onnx", [root / "first"], out, base_weights=weights)
    written = json.loads((out / "genai_config.json").read_text())
    assert written["model"]["decoder"]["filename"] == "model.onnx"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not (out / "decoder.onnx").exists()
    assert _rel(_logits(out, ids, out / "first.onnx_adapter"), refs["first"]) <= TOL
    later = tmp_path / "other.onnx_adapter"
    convert_adapter(root / "other", out / "model.onnx", later)
    assert _rel(_logits(out, ids, later), refs["other"]) <= TOL
    assert _rel(_logits(out, ids), refs["base"]) <= TOL
    # Each layer's packed qkv_proj reads one concatenated pair (A_cat (in, 4+4), B_cat (8, q+k+v)): r=4 and r=6
    # adapters switch on one session.
    manifest = read_manifest(out / "model.onnx")
    groups = manifest.packed_groups()
    assert len(groups) == 2 and all(len(g) == 2 for g in groups.values())
    sess = LoraSession(out / "model.onnx", providers=["CPUExecutionProvider"])
    sess.load_adapter("first", out / "first.onnx_adapter")
    sess.load_adapter("other", later)
    for name in ("other", "first"):
        assert _rel(_session_logits(sess, out, ids, name), refs[name]) <= TOL, name

    # The same folder in the Hugging Face cache's layout (every file a link into blobs/): the links are
    # followed (ONNX Runtime's rule), so the output holds the real tokenizer and config and runs.
    snap = tmp_path / "hub" / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "blobs").mkdir()
    for i, p in enumerate(sorted((tmp_path / "built").iterdir())):
        shutil.copy(p, tmp_path / "hub" / "blobs" / f"sha{i}")
        (snap / p.name).symlink_to(os.path.join("..", "..", "blobs", f"sha{i}"))
    cached = tmp_path / "from_cache"
    inject_files(snap / "model.onnx", [root / "first"], cached, base_weights=weights)
    assert not any(p.is_symlink() for p in cached.iterdir())
    assert (cached / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert _rel(_logits(cached, ids, cached / "first.onnx_adapter"), refs["first"]) <= TOL


def _session_logits(sess, folder, ids, adapter: str) -> np.ndarray:
    """One prompt through a LoraSession over a genai decoder (empty past, positions from the mask)."""
    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    ids = np.asarray(ids)
    feeds = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((ids.shape[0], dec["num_key_value_heads"], 0, dec["head_size"]), np.float32)
    return sess.run(["logits"], feeds, adapter=adapter)[0]


def _lora_initializers_to_inputs(path) -> None:
    """What Olive's ExtractAdapters (make_inputs, dynamic_lora_r, optional_inputs) does to the builder's model."""
    model = onnx.load(str(path))
    graph = model.graph
    for init in graph.initializer:
        if ".lora_" not in init.name:
            continue
        arr = numpy_helper.to_array(init)
        dim = 1 if ".lora_A." in init.name else 0
        info = onnx.helper.make_tensor_value_info(init.name, init.data_type, list(arr.shape))
        info.type.tensor_type.shape.dim[dim].dim_param = "lora_r"
        graph.input.append(info)
        shape = list(arr.shape)
        shape[dim] = 0
        init.CopyFrom(numpy_helper.from_array(np.zeros(shape, arr.dtype), init.name))
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")


def test_convert_for_the_genai_builders_lora_model(genai, tmp_path):
    root, ids, refs, _ = genai
    folder = tmp_path / "lora"
    _build(root / "hf", folder, tmp_path / "cache", adapter=root / "first")
    names = [i.name for i in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer]
    assert "model.layers.0.attn.q_proj.lora_A.MatMul.weight" in names  # the builder's naming
    assert _rel(_logits(folder, ids), refs["first"]) <= TOL  # the first adapter, baked in
    _lora_initializers_to_inputs(folder / "model.onnx")
    out = tmp_path / "other.onnx_adapter"
    report = convert_adapter(root / "other", folder / "model.onnx", out)
    assert report["foreign"] and len(report["slots_filled"]) == 4
    assert _rel(_logits(folder, ids, out), refs["other"]) <= TOL
    assert _rel(_logits(folder, ids), refs["base"]) <= TOL

"""Adapter files both ways with PEFT, and the refusals for unsafe or broken adapter files."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import assert_rel_close, output_of, peft_reference
from models import conv_embed_net, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

from lora_export import (
    AdapterError,
    LoraConfig,
    ShapeError,
    adapter_from_model,
    attach_lora,
    load_adapter,
    save_adapter,
)


def _perturb_trainable_non_lora(model, seed: int = 7) -> None:
    """Change trained biases / modules_to_save too, so a loader that drops them is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_load(base, directory):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()


CASES = {
    "bert_bias_all_mts": (tiny_bert, dict(target_modules=["query", "value"], bias="all", modules_to_save=["pooler"])),
    "bert_lora_only_rank_pattern": (
        tiny_bert,
        dict(
            target_modules=["key", "value"],
            bias="lora_only",
            rank_pattern={"key": 2},
            alpha_pattern={"value": 5.0},
        ),
    ),
    "gpt2_conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], use_rslora=True)),
    "llama_dora": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True)),
    "conv_dora": (conv_embed_net, dict(target_modules=["emb", "conv", "head"], use_dora=True)),
    "conv_grouped": (conv_embed_net, dict(target_modules=["conv", "gconv"], lora_dropout=0.1)),
}


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_in_peft(case, tmp_path):
    build, cfg = CASES[case]
    base, make_inputs = build()
    ours = attach_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, **cfg), verbose=False)
    randomize_lora(ours, seed=2)
    _perturb_trainable_non_lora(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="tiny")
    ref = _peft_load(base, tmp_path / "a")
    for seed in (1, 2):
        x = make_inputs(seed)
        expected = output_of(ref, x)
        assert (output_of(base, x) - expected).abs().max() > 1e-3
        assert_rel_close(output_of(ours, x), expected)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_attaches_with_equal_outputs(case, tmp_path):
    build, cfg = CASES[case]
    base, make_inputs = build()
    ref = peft_reference(base, r=4, lora_alpha=8, **cfg)
    _perturb_trainable_non_lora(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
        ref.save_pretrained(tmp_path / "p")
    adapter = load_adapter(tmp_path / "p")
    ours = attach_lora(copy.deepcopy(base), adapter, verbose=False).eval()
    for seed in (3, 4):
        x = make_inputs(seed)
        assert_rel_close(output_of(ours, x), output_of(ref, x))
    # and back out again: the canonical adapter we rebuild equals the one we loaded
    again = adapter_from_model(ours)
    assert set(again.targets) == set(adapter.targets)
    # PEFT also saves an untouched copy of a targeted embedding table; we only write what was trained.
    assert set(again.extra) <= set(adapter.extra)
    for k, t in adapter.targets.items():
        torch.testing.assert_close(torch.from_numpy(again.targets[k].B), torch.from_numpy(t.B))
        assert again.targets[k].scale == pytest.approx(t.scale)


def test_saved_files_use_peft_key_names(tmp_path):
    base, _ = conv_embed_net()
    model = attach_lora(base, LoraConfig(r=4, target_modules=["emb", "conv"], use_dora=True), verbose=False)
    save_adapter(model, tmp_path / "a")
    from safetensors.numpy import load_file

    keys = {k: v.shape for k, v in load_file(str(tmp_path / "a" / "adapter_model.safetensors")).items()}
    assert keys == {
        "base_model.model.conv.lora_A.weight": (4, 8, 3, 3),
        "base_model.model.conv.lora_B.weight": (8, 4, 1, 1),
        "base_model.model.conv.lora_magnitude_vector": (1, 8, 1, 1),
        "base_model.model.emb.lora_embedding_A": (4, 50),
        "base_model.model.emb.lora_embedding_B": (8, 4),
        "base_model.model.emb.lora_magnitude_vector": (8,),
    }
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["r"] == 4


# -- pickle adapter_model.bin ----------------------------------------------------------------------


def _bin_adapter(tmp_path, payload) -> object:
    d = tmp_path / "bin"
    d.mkdir()
    cfg = LoraConfig(r=4, target_modules=["head"]).to_peft_dict()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save(payload, d / "adapter_model.bin")
    return d


class _NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_plain_tensors_is_loaded(tmp_path):
    base, make_inputs = conv_embed_net()
    ours = attach_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["head"]), verbose=False)
    randomize_lora(ours)
    sd = {
        "base_model.model.head.lora_A.weight": ours.head.lora_A.detach().clone(),
        "base_model.model.head.lora_B.weight": ours.head.lora_B.detach().clone(),
    }
    adapter = load_adapter(_bin_adapter(tmp_path, sd))
    again = attach_lora(copy.deepcopy(base), adapter, verbose=False)
    x = make_inputs(1)
    assert_rel_close(output_of(again, x), output_of(ours.eval(), x))


def test_pickle_with_objects_is_refused(tmp_path, capsys):
    d = _bin_adapter(tmp_path, {"base_model.model.head.lora_A.weight": _NotATensor()})
    with pytest.raises(AdapterError, match="refused|pickle"):
        load_adapter(d)
    assert "must never run" not in capsys.readouterr().out


# -- missing or corrupt files ----------------------------------------------------------------------


def _saved(tmp_path):
    base, _ = conv_embed_net()
    model = attach_lora(base, LoraConfig(r=4, target_modules=["head"]), verbose=False)
    return save_adapter(model, tmp_path / "a")


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(AdapterError):
        load_adapter(tmp_path / "nope")
    d = _saved(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model"):
        load_adapter(d)
    d2 = _saved(tmp_path / "x")
    (d2 / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(d2)


def test_corrupt_weights(tmp_path):
    d = _saved(tmp_path)
    raw = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdapterError):
        load_adapter(d)
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError):
        load_adapter(d)


def test_adapter_for_another_model_is_shape_error(tmp_path):
    base, _ = tiny_llama()
    model = attach_lora(base, LoraConfig(r=4, target_modules=["q_proj"]), verbose=False)
    save_adapter(model, tmp_path / "a")
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    with pytest.raises(ShapeError, match=r"q_proj.*\(4, 32\).*\(4, 48\)"):
        attach_lora(wider, load_adapter(tmp_path / "a"), verbose=False)

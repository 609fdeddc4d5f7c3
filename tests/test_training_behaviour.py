"""Training behaviour: what is trainable, that training works, merge/unmerge, LoRA+ groups, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_rel_close, output_of
from models import conv_embed_net, randomize_lora, tiny_bert, tiny_llama

from lora_export import (
    ConfigError,
    LoraConfig,
    LoraExportError,
    ShapeError,
    TargetError,
    adapter_from_model,
    attach_lora,
    lora_layers,
    lora_summary,
    loraplus_param_groups,
    merge_lora,
    remove_lora,
    unmerge_lora,
)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_lora_params_train_and_summary(capsys):
    model, _ = tiny_llama()
    attach_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "|| all params:" in printed and "trainable%:" in printed
    names = _trainable(model)
    assert names and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    s = lora_summary(model)
    assert s["trainable"] == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)  # q: 32->32, v: 32->16 (GQA)
    assert s["lora_layers"] == 4 and s["ranks"] == [4]
    assert 0 < s["trainable_percent"] < 100


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_and_modules_to_save(bias):
    model, _ = tiny_bert()
    cfg = LoraConfig(r=2, target_modules=["query"], bias=bias, modules_to_save=["pooler"], use_dora=True)
    attach_lora(model, cfg, verbose=False)
    names = _trainable(model)
    assert "encoder.layer.0.attention.self.query.lora_magnitude" in names
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= names
    query_bias = "encoder.layer.0.attention.self.query.base_layer.bias"
    key_bias = "encoder.layer.0.attention.self.key.bias"
    assert (query_bias in names) == (bias in ("all", "lora_only"))
    assert (key_bias in names) == (bias == "all")
    assert not any(n.endswith(".weight") and "pooler" not in n for n in names)
    extra = adapter_from_model(model).extra
    assert ("encoder.layer.0.attention.self.query.bias" in extra) == (bias != "none")
    assert "pooler.dense.weight" in extra


def test_short_training_run_lowers_loss():
    model, make_inputs = tiny_llama()
    # lm_head is targeted too: the tiny random model's logits are too small for attention LoRA alone to fit.
    attach_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]), verbose=False)
    model.train()
    opt = torch.optim.Adam(loraplus_param_groups(model, lr=1e-2, ratio=4.0))
    batch = make_inputs(0)
    batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("build", [tiny_llama, conv_embed_net], ids=["llama", "conv_embed"])
def test_merge_unmerge_roundtrip(build, dora):
    model, make_inputs = build()
    targets = ["q_proj", "v_proj", "embed_tokens"] if build is tiny_llama else ["emb", "conv", "head"]
    attach_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora), verbose=False)
    randomize_lora(model, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = make_inputs(4)
    expected = output_of(model, x)
    merge_lora(model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert len(moved) == len(lora_layers(model))
    assert_rel_close(output_of(model, x), expected, 1e-5)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6)
    assert_rel_close(output_of(model, x), expected, 1e-6)


def test_remove_lora_returns_plain_model_with_merged_weights():
    model, make_inputs = tiny_bert()
    attach_lora(model, LoraConfig(r=4, target_modules=["query", "value"]), verbose=False)
    randomize_lora(model)
    x = make_inputs(1)
    expected = output_of(model, x)
    plain = remove_lora(model)
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert type(plain.encoder.layer[0].attention.self.query) is torch.nn.Linear
    assert_rel_close(output_of(plain, x), expected)


def test_merge_grouped_conv_refused():
    model, _ = conv_embed_net()
    attach_lora(model, LoraConfig(r=4, target_modules=["gconv"]), verbose=False)
    with pytest.raises(ShapeError, match="grouped"):
        merge_lora(model)


def test_loraplus_groups():
    model, _ = conv_embed_net()
    attach_lora(model, LoraConfig(r=4, target_modules=["emb", "conv", "head"], use_dora=True), verbose=False)
    groups = loraplus_param_groups(model, lr=1e-3, ratio=16.0, weight_decay=0.1)
    by_lr = {}
    for g in groups:
        by_lr.setdefault((g["lr"], g["weight_decay"]), []).extend(g["params"])
    b_params = {id(m.lora_B) for m in (model.emb, model.conv, model.head)}
    assert {id(p) for p in by_lr[(1e-3 * 16.0, 0.1)]} == b_params  # embedding B included
    assert {id(p) for p in by_lr[(1e-3, 0.1)]} == {id(m.lora_A) for m in (model.emb, model.conv, model.head)}
    assert len(by_lr[(1e-3, 0.0)]) == 3  # DoRA magnitudes: no weight decay
    assert sum(len(g["params"]) for g in groups) == len(_trainable(model))


def test_init_matches_peft_conventions():
    model, _ = conv_embed_net()
    attach_lora(model, LoraConfig(r=4, target_modules=["emb", "conv", "head"]), verbose=False)
    assert torch.count_nonzero(model.head.lora_B) == 0 and torch.count_nonzero(model.head.lora_A) > 0
    assert torch.count_nonzero(model.emb.lora_A) == 0 and torch.count_nonzero(model.emb.lora_B) > 0
    model2, _ = conv_embed_net()
    attach_lora(model2, LoraConfig(r=4, target_modules=["head"], init="gaussian"), verbose=False)
    assert 0.1 < model2.head.lora_A.std().item() < 0.4  # N(0, 1/r)


# -- errors --------------------------------------------------------------------------------------


def test_target_matching_nothing_names_closest():
    model, _ = tiny_llama()
    with pytest.raises(TargetError, match="q_proj") as e:
        attach_lora(model, LoraConfig(target_modules=["q_prj"]), verbose=False)
    assert "\n" not in str(e.value)


def test_unsupported_module_type():
    model, _ = tiny_llama()
    with pytest.raises(TargetError, match="LlamaRMSNorm"):
        attach_lora(model, LoraConfig(target_modules=["input_layernorm"]), verbose=False)


def test_bad_rank_is_config_error():
    with pytest.raises(ConfigError):
        LoraConfig(r=0)
    with pytest.raises(ConfigError):
        LoraConfig(r=4, rank_pattern={"q_proj": -1})


def test_grouped_conv_rank_must_divide_groups():
    model, _ = conv_embed_net()
    with pytest.raises(TargetError, match="groups"):
        attach_lora(model, LoraConfig(r=3, target_modules=["gconv"]), verbose=False)


def test_attach_twice_refused():
    model, _ = tiny_llama()
    attach_lora(model, LoraConfig(target_modules=["q_proj"]), verbose=False)
    with pytest.raises(LoraExportError):
        attach_lora(model, LoraConfig(target_modules=["v_proj"]), verbose=False)


def test_adapter_shape_mismatch_names_module():
    model, _ = tiny_llama()
    attach_lora(model, LoraConfig(r=4, target_modules=["q_proj"]), verbose=False)
    adapter = adapter_from_model(model)
    other, _ = tiny_bert()
    wrong = copy.deepcopy(tiny_llama()[0])
    wrong.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 16, bias=False)
    with pytest.raises(ShapeError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(32, 4\).*\(16, 4\)"):
        attach_lora(wrong, adapter, verbose=False)
    with pytest.raises(TargetError, match="not found"):
        attach_lora(other, adapter, verbose=False)


def test_merge_rounds_once_in_low_precision():
    model, make_inputs = conv_embed_net()
    model = model.to(torch.bfloat16)
    attach_lora(model, LoraConfig(r=4, target_modules=["head"]), verbose=False)
    randomize_lora(model)
    head = model.head
    w0 = head.base_layer.weight.detach().double()
    exact = w0 + (head.lora_B.double() @ head.lora_A.double()) * head.scale
    merge_lora(model)
    merged = head.base_layer.weight.detach()
    assert merged.dtype == torch.bfloat16
    # one rounding of the float32 sum: (almost) every element is the nearest bf16 to the exact value
    assert (merged == exact.to(torch.bfloat16)).float().mean() > 0.99
    assert output_of(model, make_inputs(1)).dtype == torch.bfloat16

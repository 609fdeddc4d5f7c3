"""Our LoRA layers against PEFT (the independent reference): identical LoRA weights, equal outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_rel_close, copy_from_peft, output_of, peft_reference
from models import conv_embed_net, tiny_bert, tiny_gpt2, tiny_llama

from lora_export import LoraConfig, attach_lora

MODELS = {
    "bert": (tiny_bert, ["query", "value", "dense"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),  # HF Conv1D: fan_in_fan_out
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
}
VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


def _pair(build, seed: int = 1, **cfg):
    base, make_inputs = build()
    ref = peft_reference(base, seed=seed, **cfg)
    ours = attach_lora(copy.deepcopy(base), LoraConfig(**cfg), verbose=False)
    copy_from_peft(ours, ref)
    return base, ours.eval(), ref, make_inputs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", MODELS)
def test_transformer_outputs_match_peft(arch, variant):
    build, targets = MODELS[arch]
    base, ours, ref, make_inputs = _pair(build, r=4, lora_alpha=8, target_modules=targets, **VARIANTS[variant])
    for seed in (11, 12):
        x = make_inputs(seed)
        expected = output_of(ref, x)
        # The adapter must actually change the output, or equality would prove nothing.
        assert (output_of(base, x) - expected).abs().max() > 1e-3
        assert_rel_close(output_of(ours, x), expected)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_rank_and_alpha_patterns_match_peft(arch):
    build, targets = MODELS[arch]
    rank_pattern = {
        "value" if arch == "bert" else "v_proj": 2,
        "layer.1.attention.self.query" if arch == "bert" else "layers.1.self_attn.q_proj": 6,
    }
    alpha_pattern = {"value" if arch == "bert" else "v_proj": 3.0}
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    _, ours, ref, make_inputs = _pair(build, **cfg)
    ranks = {m.r for m in ours.modules() if hasattr(m, "lora_A")}
    assert ranks == {2, 4, 6}
    x = make_inputs(5)
    assert_rel_close(output_of(ours, x), output_of(ref, x))


def test_regex_and_all_linear_targets_match_peft():
    build, _ = MODELS["llama"]
    _, ours, ref, make_inputs = _pair(build, r=4, lora_alpha=4, target_modules=r".*\.(q|o)_proj")
    assert_rel_close(output_of(ours, make_inputs(1)), output_of(ref, make_inputs(1)))

    _, ours, ref, make_inputs = _pair(build, r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True)
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    ours_targets = {n for n, m in ours.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    peft_targets = {n.removeprefix("base_model.model.") for n, m in ref.named_modules() if isinstance(m, PeftLoraLayer)}
    assert "lm_head" not in ours_targets
    assert len(ours_targets) == 2 * 7 and ours_targets == peft_targets
    assert_rel_close(output_of(ours, make_inputs(2)), output_of(ref, make_inputs(2)))


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_conv_embedding_linear_match_peft(variant):
    # DoRA: grouped convs are left out (PEFT's grouped DoRA norm reshapes B across groups; we refuse it).
    targets = ["emb", "conv", "head"] + (["gconv"] if variant == "lora" else [])
    cfg = dict(r=4, lora_alpha=6, target_modules=targets, use_dora=variant == "dora")
    base, ours, ref, make_inputs = _pair(conv_embed_net, **cfg)
    for seed in (3, 4):
        x = make_inputs(seed)
        expected = output_of(ref, x)
        assert (output_of(base, x) - expected).abs().max() > 1e-3
        assert_rel_close(output_of(ours, x), expected)


def test_training_mode_dropout_matches_peft():
    """With dropout active both implementations see the same mask when the RNG state is the same."""
    build, targets = MODELS["llama"]
    for dora in (False, True):
        cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3, use_dora=dora)
        _, ours, ref, make_inputs = _pair(build, **cfg)
        ours.train()
        ref.train()
        x = make_inputs(9)
        torch.manual_seed(123)
        a = ours(**x).logits
        torch.manual_seed(123)
        b = ref(**x).logits
        assert_rel_close(a.detach(), b.detach())


def test_dora_gradients_match_peft():
    """DoRA's detached norm: gradients of A, B and the magnitude agree with PEFT's."""
    build, _ = MODELS["gpt2"]
    _, ours, ref, make_inputs = _pair(build, r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True)
    x = make_inputs(2)
    ours(**x).logits.square().mean().backward()
    ref(**x).logits.square().mean().backward()
    inner = ref.base_model.model
    layer = ours.transformer.h[0].attn.c_attn
    peft_layer = inner.transformer.h[0].attn.c_attn
    assert_rel_close(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, 1e-4)
    assert_rel_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, 1e-4)
    assert_rel_close(layer.lora_magnitude.grad, peft_layer.lora_magnitude_vector["default"].weight.grad, 1e-4)


class _Conv13Net(torch.nn.Module):
    """Conv1d and Conv3d targets (stride, padding, a 1x1 kernel) beside the Conv2d ones in ConvEmbedNet."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 6, kernel_size=3, stride=2, padding=1)
        self.c1x1 = torch.nn.Conv1d(6, 6, kernel_size=1)
        self.c3 = torch.nn.Conv3d(2, 4, kernel_size=(1, 3, 3), padding=(0, 1, 1), bias=False)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.c1x1(self.c1(x)).flatten(1), self.c3(v).flatten(1)], dim=1)


@pytest.mark.parametrize("dora", [False, True])
def test_conv1d_conv3d_match_peft(dora):
    torch.manual_seed(0)
    base = _Conv13Net().eval()
    cfg = dict(r=2, lora_alpha=4, target_modules=["c1", "c1x1", "c3"], use_dora=dora)

    def make_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(2, 4, 9, generator=g), "v": torch.randn(2, 2, 3, 5, 5, generator=g)}

    ref = peft_reference(base, **cfg)
    ours = attach_lora(copy.deepcopy(base), LoraConfig(**cfg), verbose=False).eval()
    copy_from_peft(ours, ref)
    x = make_inputs(1)
    assert (output_of(base, x) - output_of(ref, x)).abs().max() > 1e-3
    assert_rel_close(output_of(ours, x), output_of(ref, x))


def test_exclude_modules_match_peft():
    build, _ = MODELS["llama"]
    cfg = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    _, ours, ref, make_inputs = _pair(build, **cfg)
    assert not hasattr(ours.model.layers[0].self_attn.q_proj, "lora_A")
    assert hasattr(ours.model.layers[1].self_attn.q_proj, "lora_A")
    assert_rel_close(output_of(ours, make_inputs(1)), output_of(ref, make_inputs(1)))

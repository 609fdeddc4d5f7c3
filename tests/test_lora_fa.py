"""LoRA-FA: A never moves, B trains, B's gradient is LoRA's, the input of A is no longer kept for backward,
and the adapter is plain LoRA (PEFT loads it)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_rel_close, output_of
from models import BATCH, SEQ, randomize_lora, tiny_llama

from lora_export import LoraConfig, TargetError, attach_lora, lora_layers, save_adapter
from lora_export.training.lora_fa import attach_lora_fa, freeze_lora_a, saved_activation_bytes

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
CFG = dict(r=4, lora_alpha=8, target_modules=TARGETS)


def _loss(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (BATCH, SEQ), generator=g)
    return model(input_ids=ids, labels=(ids + 3) % 100).loss


def test_training_never_updates_a_and_updates_b():
    model, _ = tiny_llama()
    attach_lora_fa(model, LoraConfig(**CFG), verbose=False)
    layers = lora_layers(model)
    a0 = {n: m.lora_A.detach().clone() for n, m in layers.items()}
    b0 = {n: m.lora_B.detach().clone() for n, m in layers.items()}
    assert all((a != 0).any() for a in a0.values())  # a real random A, not zeros
    # Every parameter handed to the optimizer, weight decay on: a frozen A must still not move.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    losses = []
    for step in range(8):
        loss = _loss(model, step % 2)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    for n, m in layers.items():
        assert torch.equal(m.lora_A, a0[n]), n  # bit-identical to init
        assert not torch.equal(m.lora_B, b0[n]), n
    assert losses[-1] < losses[0]
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_B"}


def test_b_gradient_and_input_gradient_are_lora_s():
    base, _ = tiny_llama()
    lora = attach_lora(copy.deepcopy(base), LoraConfig(**CFG), verbose=False)
    randomize_lora(lora, seed=2)
    fa = freeze_lora_a(copy.deepcopy(lora))
    grads = []
    for model in (lora, fa):
        embeds = model.get_input_embeddings()(torch.arange(14).view(2, 7)).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=torch.arange(14).view(2, 7)).loss.backward()
        grads.append(({n: m.lora_B.grad for n, m in lora_layers(model).items()}, embeds.grad))
    (b_lora, x_lora), (b_fa, x_fa) = grads
    assert all(torch.equal(b_lora[n], b_fa[n]) for n in b_lora)
    assert torch.equal(x_lora, x_fa)  # gradient through the base layers and through A to the input: unchanged
    assert all(m.lora_A.grad is None for m in lora_layers(fa).values())


def test_saved_activations_drop_by_the_inputs_of_a():
    base, _ = tiny_llama()
    measured = {}
    for name, attach in (("lora", attach_lora), ("lora_fa", attach_lora_fa)):
        model = attach(copy.deepcopy(base), LoraConfig(**CFG), verbose=False).train()
        measured[name] = saved_activation_bytes(model, lambda m=model: _loss(m, 0))
    # Per layer the inputs of q/v (one shared tensor), o and down: (hidden + hidden + intermediate) floats per token.
    per_token = (32 + 32 + 64) * 4
    assert measured["lora"] - measured["lora_fa"] == 2 * BATCH * SEQ * per_token
    assert measured["lora_fa"] < measured["lora"]


def test_adapter_is_plain_lora_that_peft_loads(tmp_path):
    from peft import PeftModel

    base, make_inputs = tiny_llama()
    model = attach_lora_fa(copy.deepcopy(base), LoraConfig(**CFG), verbose=False)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.1)  # "trained" B
    save_adapter(model, tmp_path / "fa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fa")).eval()
    x = make_inputs(4)
    assert (output_of(base, x) - output_of(ref, x)).abs().max() > 1e-3
    assert_rel_close(output_of(model.eval(), x), output_of(ref, x))


def test_peft_lorafa_optimizer_freezes_the_same_tensors():
    """PEFT's create_lorafa_optimizer also leaves A untouched (it projects B's gradient besides)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.optimizers import create_lorafa_optimizer

    base, _ = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_peft_model(copy.deepcopy(base), PeftLoraConfig(**CFG))
        opt = create_lorafa_optimizer(ref, r=4, lora_alpha=8, lr=1e-2)
    a0 = {n: p.detach().clone() for n, p in ref.named_parameters() if "lora_A" in n}
    _loss(ref, 0).backward()
    opt.step()
    assert all(torch.equal(p, a0[n]) for n, p in ref.named_parameters() if "lora_A" in n)
    ours = attach_lora_fa(copy.deepcopy(base), LoraConfig(**CFG), verbose=False)
    trainable_ref = {
        n.removeprefix("base_model.model.").replace(".default.weight", "")
        for n, p in ref.named_parameters()
        if p.requires_grad
    }
    assert trainable_ref == {n for n, p in ours.named_parameters() if p.requires_grad}


def test_embedding_targets_are_refused():
    model, _ = tiny_llama()
    with pytest.raises(TargetError, match="embedding"):
        attach_lora_fa(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), verbose=False)
    assert not lora_layers(model)

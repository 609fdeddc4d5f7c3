"""Shared helpers: PEFT as the independent reference, and weight copying between PEFT and our layers."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from models import randomize_lora  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def output_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The first output tensor (last_hidden_state / logits / a plain tensor)."""
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out[0]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """max|a-b| <= rel · max|b| (and the reference is not trivially zero)."""
    scale = expected.abs().max().item()
    assert scale > 0, "reference output is all zeros"
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} exceeds {rel:g} x {scale:.3g}"


def peft_reference(base: nn.Module, seed: int = 1, **config) -> nn.Module:
    """A PEFT LoRA model on a deepcopy of ``base`` with randomized (nonzero) LoRA weights, in eval mode."""
    import warnings

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(**config))
    randomize_lora(peft_model, seed=seed)
    return peft_model.eval()


def saved_peft_reference(base: nn.Module, path, **config) -> nn.Module:
    """``peft_reference`` saved with PEFT's own ``save_pretrained`` (its defaults) to ``path``."""
    import warnings

    peft_model = peft_reference(base, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(path))
    return peft_model


def copy_from_peft(ours: nn.Module, peft_model: nn.Module, adapter: str = "default") -> None:
    """Copy each PEFT LoRA layer's tensors into our wrapper at the same module path."""
    from lora_export.training.attach import lora_layers

    inner = peft_model.base_model.model
    layers = lora_layers(ours)
    assert layers, "no LoRA layers attached"
    with torch.no_grad():
        for path, layer in layers.items():
            ref = inner.get_submodule(path)
            if layer.kind == "embedding":
                layer.lora_A.copy_(ref.lora_embedding_A[adapter])
                layer.lora_B.copy_(ref.lora_embedding_B[adapter])
            else:
                layer.lora_A.copy_(ref.lora_A[adapter].weight)
                layer.lora_B.copy_(ref.lora_B[adapter].weight)
            assert layer.scale == pytest.approx(ref.scaling[adapter])
            if layer.lora_magnitude is not None:
                layer.lora_magnitude.copy_(ref.lora_magnitude_vector[adapter].weight.reshape(-1))


@pytest.fixture
def tmp_adapter_dir(tmp_path):
    return tmp_path / "adapter"

"""LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): A frozen at its random init, only B trained.

With A frozen, autograd needs only h = x·Aᵀ (for B's gradient) and A itself (for x's): the input x of each
adapted layer is no longer kept for backward, which is LoRA-FA's activation-memory saving. PyTorch
already saves nothing for a matmul operand whose partner needs no gradient, so the plain LoRA forward
gets the saving as is; ``saved_activation_bytes`` measures it. The adapter is plain LoRA (saved, merged
and injected as any other).

PEFT's ``create_lorafa_optimizer`` (arXiv 2505.08054) also freezes A, and in addition projects B's
gradient by (AAᵀ)⁻¹/s² inside its AdamW; that is an optimizer choice, not part of the adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.config import LoraConfig
from ..errors import TargetError
from .attach import attach_lora, lora_layers, remove_lora


def attach_lora_fa(model: nn.Module, config: LoraConfig, *, verbose: bool = True) -> nn.Module:
    """``attach_lora`` with every A frozen at its initialisation: only B (and DoRA magnitudes, trained
    biases, modules_to_save) train. Embedding targets are refused: their A starts at zero (PEFT's init),
    so with A frozen ΔW would stay 0. Returns ``model``."""
    attach_lora(model, config, verbose=False)
    layers = lora_layers(model)
    embeddings = [n for n, m in layers.items() if m.kind == "embedding"]
    if embeddings:
        remove_lora(model, merge=False)
        raise TargetError(
            f"LoRA-FA cannot train embedding {embeddings[0]!r}: its A starts at zero, so freezing it freezes ΔW = 0"
        )
    freeze_lora_a(model)
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA-FA: {len(layers)} layers, A frozen; trainable params: {trainable:,d}")
    return model


def freeze_lora_a(model: nn.Module) -> nn.Module:
    """Freeze the A matrix of every LoRA layer of ``model`` (LoRA-FA's option on an attached model)."""
    layers = lora_layers(model)
    if not layers:
        raise TargetError("model has no LoRA layers (call attach_lora first)")
    for layer in layers.values():
        layer.lora_A.requires_grad_(False)
    return model


def saved_activation_bytes(model: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward while ``step()`` builds the graph, parameters excluded.

    ``step`` runs a forward pass and returns the loss. Tensors are counted by storage (views of one
    buffer count once), through ``torch.autograd.graph.saved_tensors_hooks``, so this works on any device.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    del loss
    return sum(seen.values())

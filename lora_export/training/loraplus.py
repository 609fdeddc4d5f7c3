"""LoRA+ (Hayou et al. 2024): train B with a larger learning rate than A (ratio λ ≈ 16)."""

from __future__ import annotations

from torch import nn

from .layers import LoraLayer


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+: every B matrix (embedding B included) at ``lr * ratio``,
    A matrices and other trainable matrices at ``lr``; 1-D parameters (biases, DoRA magnitudes) at
    ``lr`` without weight decay. Only parameters that require grad are included; empty groups are dropped.
    """
    b_ids = {id(m.lora_B) for m in model.modules() if isinstance(m, LoraLayer)}
    groups: dict[str, list] = {"A": [], "B": [], "vec": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = "B" if id(p) in b_ids else ("vec" if p.dim() <= 1 else "A")
        groups[key].append(p)
    spec = {
        "A": {"lr": lr, "weight_decay": weight_decay},
        "B": {"lr": lr * ratio, "weight_decay": weight_decay},
        "vec": {"lr": lr, "weight_decay": 0.0},
    }
    return [{"params": ps, **spec[k]} for k, ps in groups.items() if ps]

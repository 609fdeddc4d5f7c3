"""AdaLoRA training (Zhang et al. 2023): SVD-form LoRA layers, the rank allocator, orthogonality, PEFT's format.

Each target holds ΔW = P·Λ·Q as PEFT does: ``lora_B`` (P, out × r), ``lora_E`` (Λ, r × 1) and ``lora_A``
(Q, r × in), scaled by lora_alpha / (init_r + 1e-5). ``RankAllocator`` scores each triplet (Pᵢ, λᵢ, Qᵢ) by
smoothed sensitivity × uncertainty and zeroes the λ of the least important ones until the budget of the
cubic schedule is met. The saved adapter keeps only the surviving triplets, in PEFT's ``ADALORA`` format.

    attach_adalora(model, AdaLoraConfig(init_r=12, target_r=4, total_step=N, target_modules=[...]))
    allocator = RankAllocator(model)
    for step in range(N):
        loss = task_loss(model) + orth_regularization(model)   # PEFT adds the second term in its forward
        loss.backward(); optimizer.step()
        allocator.update_and_allocate(step)                     # after backward, before zero_grad
        optimizer.zero_grad()
    save_adapter(model, "adalora/")   # PEFT's ADALORA format; merge/inject read it like any adapter
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.adalora_config import AdaLoraConfig, budget_schedule
from ..core.adapter import Adapter, LoraTarget
from ..errors import TargetError
from ..formats.peft_adalora import compile_svd_target, pinned_config, save_adalora_files
from .attach import (
    _CONFIG_ATTR,
    VARIANT_ATTR,
    _extra_names,
    _plain_parameters,
    _set_module,
    attach_lora,
    lora_layers,
    remove_lora,
)
from .layers import LoraLinear, _np


class AdaLoraLinear(LoraLinear):
    """LoRA's Linear/Conv1D wrapper with PEFT's SVD form: ``x·(A⊙E)ᵀ·Bᵀ·scale`` and a mask of kept triplets.

    ``rank_mask`` marks the triplets the allocator kept; pruned ones have λ = 0 and are dropped from the
    adapter. ``ranknum`` stays the initial rank (the scale does not change as ranks are pruned).
    """

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, scale, dropout)
        self.lora_E = self._new_param(r, 1)
        self.ranknum = r
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=self.lora_A.device))

    def reset_lora(self, init: str) -> None:
        """PEFT's AdaLoRA init: λ = 0 (ΔW starts at 0), P and Q ~ N(0, 0.02²)."""
        with torch.no_grad():
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """P, Λ and Q."""
        return [self.lora_A, self.lora_B, self.lora_E]

    def _lora_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        # As PEFT: every triplet takes part (pruned ones have λ = 0 after each allocation).
        lora = F.linear(F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A * self.lora_E), self.lora_B)
        return (result + lora * self.scale).to(result.dtype)

    def kept_triplets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A, E, B) of the kept triplets, as PEFT saves them."""
        keep = self.rank_mask.to(self.lora_A.device)
        return _np(self.lora_A[keep]), _np(self.lora_E[keep]), _np(self.lora_B[:, keep])

    def to_target(self, name: str) -> LoraTarget | None:
        """The canonical target of the kept triplets (A′ = A⊙E, B′ = B), or None when all were pruned."""
        a, e, b = self.kept_triplets()
        return compile_svd_target(name, a, e, b, self.scale, self.fan_in_fan_out)

    def merge(self, name: str = "layer") -> None:
        if not self.merged and not bool(self.rank_mask.any()):
            self.merged = True  # nothing to fold: every triplet was pruned
            return
        super().merge(name)

    def unmerge(self) -> None:
        if self.merged and not bool(self.rank_mask.any()):
            self.merged = False
            return
        super().unmerge()

    def extra_repr(self) -> str:
        return f"r={self.r}, kept={int(self.rank_mask.sum())}, scale={self.scale:g}"


@dataclasses.dataclass
class _AdaLoraState:
    """What an AdaLoRA model carries besides its layers: the config and whether ranks were allocated yet."""

    config: AdaLoraConfig
    allocated: bool = False

    def finish_adapter(self, adapter: Adapter) -> Adapter:
        # Per-target ranks and scales differ from the LoRA config at init_r: pin them so a save as LoRA holds.
        return dataclasses.replace(adapter, config=pinned_config(adapter.config, adapter.targets))

    def save(self, model: nn.Module, directory: str | os.PathLike, base: str | None) -> Path:
        layers = adalora_layers(model)
        pattern = {f"{n}.lora_E": m.rank_mask.tolist() for n, m in layers.items()} if self.allocated else None
        config = self.config
        if any(m.fan_in_fan_out for m in layers.values()):
            config = dataclasses.replace(config, fan_in_fan_out=True)  # as PEFT records Conv1D targets
        params = _plain_parameters(model)
        lora_cfg = getattr(model, _CONFIG_ATTR, None) or config.lora_config()
        extra = {k: _np(params[k]) for k in _extra_names(model, lora_cfg)}
        triplets = {n: m.kept_triplets() for n, m in layers.items()}
        return save_adalora_files(directory, triplets, config.to_peft_dict(pattern, base), extra)


def attach_adalora(model: nn.Module, config: AdaLoraConfig, *, verbose: bool = True) -> nn.Module:
    """Wrap the target modules of ``model`` in place with AdaLoRA layers at rank ``init_r``; freeze the rest.

    Targets are matched as by ``attach_lora`` (Linear and transformers' Conv1D, as PEFT's AdaLoRA trains
    them). ``save_adapter`` then writes PEFT's ADALORA format and ``adapter_from_model`` gives the
    canonical adapter of the surviving triplets. Returns ``model``.
    """
    if not isinstance(config, AdaLoraConfig):
        raise TypeError(f"attach_adalora needs an AdaLoraConfig, got {type(config).__name__}")
    attach_lora(model, config.lora_config(), verbose=False)
    layers = lora_layers(model)
    wrong = [n for n, m in layers.items() if type(m) is not LoraLinear]
    if wrong:
        remove_lora(model, merge=False)
        raise TargetError(f"AdaLoRA trains Linear and Conv1D modules only; {wrong[0]!r} is not one")
    for name, layer in layers.items():
        ada = AdaLoraLinear(layer.base_layer, config.init_r, config.scale, config.lora_dropout)
        ada.reset_lora("default")
        _set_module(model, name, ada)
        for p in ada.trainable_parameters():
            p.requires_grad_(True)
    setattr(model, VARIANT_ATTR, _AdaLoraState(config))
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"AdaLoRA: {len(layers)} layers at init_r={config.init_r}, trainable params: {trainable:,d}")
    return model


def adalora_layers(model: nn.Module) -> dict[str, AdaLoraLinear]:
    """The AdaLoRA layers of ``model`` by module path (in module order)."""
    return {n: m for n, m in lora_layers(model).items() if isinstance(m, AdaLoraLinear)}


def _state(model: nn.Module) -> _AdaLoraState:
    state = getattr(model, VARIANT_ATTR, None)
    if not isinstance(state, _AdaLoraState):
        raise TargetError("model has no AdaLoRA layers (call attach_adalora first)")
    return state


def orth_regularization(model: nn.Module) -> torch.Tensor:
    """``orth_reg_weight`` × the mean over all P and Q of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F: the term PEFT adds to
    ``outputs.loss`` in its AdaLoRA forward (add it to your loss)."""
    weight = _state(model).config.orth_reg_weight
    total, count = 0, 0
    for layer in adalora_layers(model).values():
        for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return weight * (total / count)


# -- the importance math, as pure functions (PEFT's RankAllocator, term by term) -----------------------


def sensitivity_ema(
    param: torch.Tensor, grad: torch.Tensor, avg: torch.Tensor, unc: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the smoothed sensitivity Ī and uncertainty Ū (paper eq. 8-9), per entry.

    I = |p·∇p|; Ī ← β₁Ī + (1-β₁)I; Ū ← β₂Ū + (1-β₂)|I - Ī| (with the new Ī, as PEFT).
    """
    ipt = (param * grad).abs()
    avg = beta1 * avg + (1 - beta1) * ipt
    unc = beta2 * unc + (1 - beta2) * (ipt - avg).abs()
    return avg, unc


def triplet_importance(score_a: torch.Tensor, score_e: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    """Importance of each triplet i (paper eq. 10): s(λᵢ) + mean_j s(Qᵢⱼ) + mean_j s(Pⱼᵢ), shape (r,).

    ``score_*`` are the entry scores Ī·Ū of Q (r, in), Λ (r, 1) and P (out, r).
    """
    vectors = torch.cat([score_a.mean(dim=1, keepdim=True), score_b.mean(dim=0).view(-1, 1)], dim=1)
    return score_e.view(-1) + vectors.sum(dim=1)


def prune_threshold(scores: torch.Tensor, n_pruned: int) -> float:
    """The n-th smallest triplet score: triplets scoring at or below it are cut (ties all go, as PEFT's ``<=``)."""
    return torch.kthvalue(scores, k=n_pruned)[0].item()


class RankAllocator:
    """PEFT's AdaLoRA rank allocator over our layers: call ``update_and_allocate(step)`` every step.

    Before ``total_step - tfinal`` it updates the importance of every P, Λ, Q entry and, on the schedule's
    steps, prunes to the budget; at ``total_step - tfinal`` it fixes the final ranks (``target_r`` per
    target on average); after it re-applies those masks (the optimizer may have moved pruned λ's).
    """

    def __init__(self, model: nn.Module) -> None:
        self._state = _state(model)
        self.config = self._state.config
        self.layers = adalora_layers(model)
        self.init_bgt = sum(m.r for m in self.layers.values())
        self.target_bgt = self.config.target_r * len(self.layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(the total rank budget at ``step``, whether this step prunes): ``budget_schedule``."""
        c = self.config
        return budget_schedule(
            step,
            init_bgt=self.init_bgt,
            target_bgt=self.target_bgt,
            tinit=c.tinit,
            tfinal=c.tfinal,
            total_step=c.total_step,
            deltaT=c.deltaT,
        )

    def update_ipt(self) -> None:
        """Fold the current gradients into the smoothed sensitivity and uncertainty of every entry."""
        c = self.config
        for path, layer in self.layers.items():
            for part in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, part)
                if p.grad is None:
                    raise TargetError(
                        f"{path}.{part} has no gradient: call update_and_allocate after backward(), before zero_grad()"
                    )
                key = f"{path}.{part}"
                zero = torch.zeros_like(p)
                with torch.no_grad():
                    self.exp_avg_ipt[key], self.exp_avg_unc[key] = sensitivity_ema(
                        p.detach(), p.grad, self.exp_avg_ipt.get(key, zero), self.exp_avg_unc.get(key, zero),
                        c.beta1, c.beta2,
                    )  # fmt: skip

    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Keep the ``budget`` most important triplets model-wide, zero the others' λ; the kept masks by path."""
        if not self.exp_avg_ipt:
            raise TargetError("no importance scores yet: call update_and_allocate every training step")
        scores = {}
        for path in self.layers:
            s = {
                p: self.exp_avg_ipt[f"{path}.{p}"] * self.exp_avg_unc[f"{path}.{p}"]
                for p in ("lora_A", "lora_E", "lora_B")
            }
            scores[path] = triplet_importance(s["lora_A"], s["lora_E"], s["lora_B"])
        threshold = prune_threshold(torch.cat(list(scores.values())), self.init_bgt - budget)
        masks = {path: ~(s <= threshold) for path, s in scores.items()}
        self._apply(masks)
        self._state.allocated = True
        return masks

    def _apply(self, masks: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for path, keep in masks.items():
                layer = self.layers[path]
                layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
                layer.rank_mask.copy_(keep)

    def update_and_allocate(self, step: int) -> int:
        """The allocation step PEFT's ``AdaLoraModel.update_and_allocate`` runs; returns the budget at ``step``."""
        final = self.config.total_step - self.config.tfinal
        if step < final:
            self.update_ipt()
            budget, prune = self.budget(step)
            if prune:
                self.mask_to_budget(budget)
            return budget
        if step == final:
            budget, _ = self.budget(step)
            self.mask_to_budget(budget)
            self.reset_ipt()
            return budget
        self._apply({path: layer.rank_mask.clone() for path, layer in self.layers.items()})
        return self.target_bgt

    def ranks(self) -> dict[str, int]:
        """The number of kept triplets of every target."""
        return {path: int(layer.rank_mask.sum()) for path, layer in self.layers.items()}

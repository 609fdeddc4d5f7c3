"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411) as a training callback: after a warm-up of K optimizer
steps, the base weight also moves by λ·(B_{t+1}A_{t+1} − B_tA_t) each step.

    delta = DeltaLora(model, update_ratio=2.0, start_step=K)   # after attach_lora, lora_dropout=0
    for batch in data:
        loss(model, batch).backward(); opt.step(); opt.zero_grad()
        delta.step()                                           # after every optimizer step
    delta.save("adapters/delta")                               # the DELTA_LORA format, rank ≤ 2r canonical

W never gets a gradient (``attach_lora`` froze it); ``step`` writes it under ``torch.no_grad``. The updates
telescope, so instead of adding each step's difference, ``step`` sets W = W₀ + λ·(B_tA_t − B_KA_K) from a
float32 copy of W₀ taken at step K: the same weight, rounded once per step into the stored dtype rather than
accumulating one rounding per step. The cost is that copy (one float32 copy of each adapted weight).
λ multiplies the product difference as given (the LoRA path keeps its own scale s); the paper removes
dropout from the LoRA path, so ``lora_dropout`` must be 0.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.adapter import Adapter
from ..errors import ConfigError, TargetError
from ..formats.delta_lora import compile_delta_lora, save_delta_lora_files
from .attach import MOVED_BASE_ATTR, collect_adapter, lora_layers
from .layers import LoraLayer


def _product(layer: LoraLayer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B·A in the layout of the module's weight (torch layout, before fan_in_fan_out), float32."""
    a, b = a.float(), b.float()
    if layer.kind == "linear":
        return b @ a
    if layer.kind == "embedding":
        return (b @ a).T
    return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(layer.base_layer.weight.shape)


class DeltaLora:
    """Moves the base weights of ``model``'s LoRA layers as Delta-LoRA does; call ``step()`` after each
    ``optimizer.step()``. ``update_ratio`` is λ, ``start_step`` K (the paper's warm-up)."""

    def __init__(self, model: nn.Module, update_ratio: float = 2.0, start_step: int = 500) -> None:
        layers = lora_layers(model)
        if not layers:
            raise TargetError("model has no LoRA layers (call attach_lora first)")
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ConfigError(f"Delta-LoRA start_step must be an integer >= 0, got {start_step!r}")
        if not np.isfinite(float(update_ratio)):
            raise ConfigError(f"Delta-LoRA update_ratio must be finite, got {update_ratio!r}")
        for name, layer in layers.items():
            if not isinstance(layer.dropout, nn.Identity):
                raise ConfigError(f"{name}: Delta-LoRA needs lora_dropout=0 (the paper removes dropout from LoRA)")
            if layer.lora_magnitude is not None:
                raise ConfigError(f"{name}: Delta-LoRA with DoRA is not supported")
            if layer.kind == "conv" and getattr(layer, "groups", 1) != 1:
                raise ConfigError(f"{name}: Delta-LoRA on a grouped convolution has no weight update form")
            if layer.merged:
                raise TargetError(f"{name}: LoRA is merged; unmerge it first")
        self.model = model
        self.layers = layers
        self.update_ratio = float(update_ratio)
        self.start_step = start_step
        self.steps = 0
        self._start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._w0: dict[str, torch.Tensor] = {}
        if start_step == 0:
            self._snapshot()

    def __repr__(self) -> str:
        return "DeltaLora"

    def _snapshot(self) -> None:
        with torch.no_grad():
            self._start = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in self.layers.items()}
            self._w0 = {n: m._weight_torch_layout().detach().float().clone() for n, m in self.layers.items()}

    def step(self) -> None:
        """Count one optimizer step; from step K + 1 on, set W = W₀ + λ·(B_tA_t − B_KA_K)."""
        self.steps += 1
        if self.steps < self.start_step:
            return
        if self._start is None:
            self._snapshot()
            return
        with torch.no_grad():
            for name, layer in self.layers.items():
                a_k, b_k = self._start[name]
                diff = _product(layer, layer.lora_A, layer.lora_B) - _product(layer, a_k, b_k)
                w = self._w0[name] + self.update_ratio * diff
                weight = layer.base_layer.weight
                weight.copy_((w.T if layer.fan_in_fan_out else w).to(weight.dtype))
        setattr(self.model, MOVED_BASE_ATTR, "DeltaLora")

    def _parts(self, name: str) -> tuple[Adapter, Adapter | None]:
        final = collect_adapter(self.model, name)
        if self._start is None or self.steps <= self.start_step:
            return final, None  # W has not moved: plain LoRA
        targets = {
            n: dataclasses.replace(
                final.targets[n],
                A=a.detach().to("cpu", torch.float32).numpy().copy(),
                B=b.detach().to("cpu", torch.float32).numpy().copy(),
            )
            for n, (a, b) in self._start.items()
        }
        return final, dataclasses.replace(final, targets=targets, extra={})

    def adapter(self, name: str = "adapter") -> Adapter:
        """The canonical adapter for the untouched base: rank 2r per module once W has moved (else plain LoRA)."""
        final, start = self._parts(name)
        return compile_delta_lora(final, start, self.update_ratio)

    def save(self, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
        """Write the run in the DELTA_LORA format (A_T, B_T, the step-K snapshot, λ, K)."""
        final, start = self._parts(Path(directory).name)
        if base_model_name_or_path is None:
            own = self.model.__dict__.get("name_or_path")
            base_model_name_or_path = own if isinstance(own, str) and own else None
        return save_delta_lora_files(
            final,
            start,
            directory,
            update_ratio=self.update_ratio,
            start_step=self.start_step,
            steps=self.steps,
            base_model_name_or_path=None if base_model_name_or_path is None else os.fspath(base_model_name_or_path),
        )

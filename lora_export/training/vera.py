"""VeRA layers for training: LoRA's Linear wrapper whose A′ and B′ are λ-scaled slices of shared frozen projections.

``VeraLinear`` is a ``LoraLinear`` (nn.Linear or transformers' Conv1D) with ``lora_A`` = Λ_d·A[:, :in] and
``lora_B`` = Λ_b·B[:out] computed from the trainable λ vectors and the model-wide ``VeraProjections``, and
scale 1: forward, merge, unmerge and the canonical target are LoRA's own code. The projections are one
module shared by every layer (one copy, moved with the model), generated as PEFT does (``vera``).
``attach_lora`` with a ``VeraConfig`` (or a VeRA ``Adapter``) wraps the targets with these layers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.vera import VeraConfig, VeraProjection, VeraRecord, VeraVectors, bind, generate_projection
from ..errors import ShapeError, TargetError
from .layers import LoraLayer, LoraLinear, _hf_conv1d_type, _np


class VeraProjections(nn.Module):
    """The frozen shared A (r, max_in) and B (max_out, r) as buffers (not in the model's state dict)."""

    def __init__(self, projection: VeraProjection) -> None:
        super().__init__()
        self.key = projection.key
        self.register_buffer("A", torch.from_numpy(np.array(projection.A, dtype=np.float32)), persistent=False)
        self.register_buffer("B", torch.from_numpy(np.array(projection.B, dtype=np.float32)), persistent=False)

    def to_projection(self) -> VeraProjection:
        return VeraProjection(self.key, _np(self.A), _np(self.B))


class VeraLinear(LoraLinear):
    """VeRA on nn.Linear / Conv1D: y = base(x) + λ_b ⊙ (B[:out]·(λ_d ⊙ A[:, :in]·x)), PEFT's VeRA Linear."""

    def __init__(self, base_layer: nn.Module, shared: VeraProjections, dropout: float = 0.0, d_initial: float = 0.1):
        # LoraLayer's state without LoraLinear's own A/B parameters: here they are computed.
        LoraLayer.__init__(self, base_layer, int(shared.A.shape[0]), 1.0, dropout)
        conv1d = _hf_conv1d_type()
        self._fan_in_fan_out = conv1d is not None and isinstance(base_layer, conv1d)
        self.out_features, self.in_features = (int(d) for d in self._weight_torch_layout().shape)
        if self.in_features > shared.A.shape[1] or self.out_features > shared.B.shape[0]:
            raise ShapeError(
                f"layer {self.in_features} → {self.out_features} exceeds the VeRA projections "
                f"({shared.A.shape[1]} → {shared.B.shape[0]})"
            )
        self.vera_shared = shared
        self.d_initial = float(d_initial)
        self.vera_lambda_d = self._new_param(self.r)
        self.vera_lambda_b = self._new_param(self.out_features)

    @property
    def lora_A(self) -> torch.Tensor:  # type: ignore[override]
        return self.vera_lambda_d.unsqueeze(-1) * self.vera_shared.A[:, : self.in_features].to(self.vera_lambda_d)

    @property
    def lora_B(self) -> torch.Tensor:  # type: ignore[override]
        return self.vera_lambda_b.unsqueeze(-1) * self.vera_shared.B[: self.out_features, :].to(self.vera_lambda_b)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.vera_lambda_d, self.vera_lambda_b]

    def reset_lora(self, init: str) -> None:
        """PEFT's VeRA init: λ_d = d_initial, λ_b = 0 (ΔW starts at 0)."""
        with torch.no_grad():
            self.vera_lambda_d.fill_(self.d_initial)
            self.vera_lambda_b.zero_()

    def init_dora(self) -> None:
        raise TargetError("DoRA does not apply to VeRA layers")

    def load_vectors(self, vectors: VeraVectors, name: str) -> None:
        """Copy λ_d and λ_b in; ShapeError when they do not fit."""
        for what, param, arr in (
            ("vera_lambda_d", self.vera_lambda_d, vectors.lambda_d),
            ("vera_lambda_b", self.vera_lambda_b, vectors.lambda_b),
        ):
            if tuple(param.shape) != tuple(arr.shape):
                raise ShapeError(
                    f"{name}: adapter {what} has shape {tuple(arr.shape)}, the model needs {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(param.dtype))

    def vectors(self) -> VeraVectors:
        return VeraVectors(_np(self.vera_lambda_d), _np(self.vera_lambda_b))

    def extra_repr(self) -> str:
        return f"r={self.r}, vera, in={self.in_features}, out={self.out_features}"


def in_features_of(module: nn.Module) -> int:
    """Input features of a Linear or Conv1D (whose weight is stored (in, out))."""
    conv1d = _hf_conv1d_type()
    w = module.weight
    return int(w.shape[0] if conv1d is not None and isinstance(module, conv1d) else w.shape[1])


def check_vera_module(name: str, module: nn.Module) -> None:
    """PEFT's VeRA wraps nn.Linear and transformers' Conv1D only."""
    conv1d = _hf_conv1d_type()
    if not (isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))):
        raise TargetError(f"module {name!r} is a {type(module).__name__}; VeRA supports Linear and Conv1D only")


def vera_projections(
    modules: dict[str, nn.Module], targets: list[str], config: VeraConfig, adapter: Adapter | None
) -> tuple[VeraProjections, Adapter | None]:
    """The shared projections for ``targets`` (PEFT's: sized for the largest of them, from the key), and the
    adapter bound to the model's layer sizes (its stored projections win, as in PEFT)."""
    for name in targets:
        check_vera_module(name, modules[name])
    sizes = {n: in_features_of(modules[n]) for n in targets}
    if adapter is not None:
        adapter = bind(adapter, sizes)
        return VeraProjections(adapter.vera.projection), adapter
    max_in = max(sizes.values())
    max_out = max(int(modules[n].weight.numel()) // sizes[n] for n in targets)
    return VeraProjections(generate_projection(config.projection_prng_key, config.r, max_in, max_out)), None


def vera_layer(module: nn.Module, shared: VeraProjections, config: VeraConfig) -> VeraLinear:
    return VeraLinear(module, shared, config.vera_dropout, config.d_initial)


def vera_record(layers: dict[str, LoraLayer], config: VeraConfig) -> VeraRecord:
    """The VeRA record of a model's VeRA layers (its projection, λ vectors and layer sizes)."""
    vera = {n: m for n, m in layers.items() if isinstance(m, VeraLinear)}
    shared = next(iter(vera.values())).vera_shared.to_projection()
    return VeraRecord(
        key=config.projection_prng_key,
        r=config.r,
        vectors={n: m.vectors() for n, m in vera.items()},
        projection=shared,
        in_features={n: m.in_features for n, m in vera.items()},
        save_projection=config.save_projection,
    )

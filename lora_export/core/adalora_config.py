"""AdaLoRA's configuration (Zhang et al. 2023, arXiv 2303.10512) and its budget schedule, torch-free.

AdaLoRA trains ΔW = P·Λ·Q per target (PEFT's ``lora_B``, ``lora_E``, ``lora_A``), starting every target at
``init_r`` and pruning the least important singular triplets until the whole model holds ``target_r`` per
target on average. The schedule and PEFT's adapter_config.json live here, so the format loader needs no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..safejson import short_repr
from .config import LoraConfig

# PEFT ignores ``r`` for AdaLoRA and warns when it is not LoraConfig's default; we write that default.
_PEFT_UNUSED_R = 8


@dataclass
class AdaLoraConfig:
    """AdaLoRA's settings (field names and defaults follow PEFT's ``AdaLoraConfig``).

    init_r / target_r: every target starts at rank ``init_r``; pruning leaves ``target_r × targets`` ranks
    in all (unevenly spread). tinit / tfinal: steps before pruning starts and after it ends, of
    ``total_step`` (required). deltaT: steps between two allocations. beta1 / beta2: EMA factors of the
    sensitivity and of its uncertainty. orth_reg_weight: weight of ‖PᵀP − I‖ + ‖QQᵀ − I‖ in the loss.
    The other fields mean what they mean in ``LoraConfig`` (rank and alpha patterns do not apply).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - PEFT's field name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        for what in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, what)
            low = 1 if what in ("init_r", "target_r", "deltaT") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"AdaLoRA {what} must be an integer >= {low}, got {short_repr(value)}")
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoRA target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        total = self.total_step
        if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
            raise ConfigError(f"AdaLoRA needs total_step, a positive integer (got {short_repr(total)})")
        if self.tinit >= total - self.tfinal:
            raise ConfigError(
                f"AdaLoRA tinit={self.tinit}, tfinal={self.tfinal} leave no pruning phase in total_step={total}"
            )
        for what in ("beta1", "beta2"):
            value = getattr(self, what)
            if not _real(value) or not 0 < value < 1:
                raise ConfigError(f"AdaLoRA {what} must be in (0, 1), got {short_repr(value)}")
        if not _real(self.orth_reg_weight) or not 0 <= self.orth_reg_weight < math.inf:
            raise ConfigError(f"AdaLoRA orth_reg_weight must be >= 0, got {short_repr(self.orth_reg_weight)}")
        if not _real(self.lora_alpha) or self.lora_alpha <= 0:
            # PEFT falls back to scaling = r for alpha <= 0, with r the initial rank in training but the pruned
            # rank after reloading: the trained model and the saved adapter would disagree.
            raise ConfigError(f"AdaLoRA lora_alpha must be positive, got {short_repr(self.lora_alpha)}")
        self.lora_config()  # validates the fields shared with LoRA

    def lora_config(self) -> LoraConfig:
        """The fields shared with LoRA, as a LoraConfig at rank ``init_r`` (targets, dropout, bias, ...)."""
        return LoraConfig(
            r=self.init_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            bias=self.bias,
            modules_to_save=self.modules_to_save,
            fan_in_fan_out=self.fan_in_fan_out,
        )

    @property
    def scale(self) -> float:
        """The scale of every target: PEFT's ``scaling / (ranknum + 1e-5)`` (``adalora_scale``)."""
        return adalora_scale(self.lora_alpha, self.init_r)

    def to_peft_dict(
        self, rank_pattern: dict[str, list[bool]] | None, base_model_name_or_path: str | None = None
    ) -> dict[str, Any]:
        """PEFT's adapter_config.json for an AdaLoRA adapter (``peft_type: ADALORA``).

        ``rank_pattern``: per target ``<path>.lora_E`` the kept flags of its ``init_r`` triplets (PEFT's
        form), or None before any pruning.
        """
        shared = self.lora_config().to_peft_dict(base_model_name_or_path)
        for key in ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora"):
            shared.pop(key)
        ada = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in shared}
        return {**shared, **ada, "peft_type": "ADALORA", "r": _PEFT_UNUSED_R, "rank_pattern": rank_pattern}


def adalora_scale(lora_alpha: float, ranknum: float) -> float:
    """PEFT's AdaLoRA scale ``lora_alpha / (ranknum + 1e-5)``, ``ranknum`` being the initial rank (PEFT keeps
    it when ranks are pruned). ``ranknum + 1e-5`` is a float32 sum in PEFT (a float32 buffer); so it is here."""
    return float(lora_alpha) / float(np.float32(ranknum) + np.float32(1e-5))


def budget_schedule(
    step: int,
    *,
    init_bgt: int,
    target_bgt: int,
    tinit: int,
    tfinal: int,
    total_step: int,
    deltaT: int,  # noqa: N803
) -> tuple[int, bool]:
    """(rank budget of the whole model at ``step``, whether to prune at this step): PEFT's schedule.

    ``init_bgt`` until ``tinit``; then cubic decay ``target + (init - target)·(1 - (t - tinit)/span)³``
    (``span = total_step - tfinal - tinit``, truncated to an integer), pruning every ``deltaT`` steps;
    ``target_bgt`` once fewer than ``tfinal`` steps remain.
    """
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % deltaT == 0


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""Adapter arithmetic: one LoRA adapter whose ΔW is Σ wᵢ·ΔWᵢ, exactly (``cat``) or truncated to rank K (``svd``).

``cat``: per target, A = [A₁; A₂; ...] and B = [c₁B₁, c₂B₂, ...] with cᵢ = wᵢ·sᵢ (each adapter's own resolved
scale: α/r, α/√r with rsLoRA, rank/alpha patterns), so B·A = Σ cᵢBᵢAᵢ = Σ wᵢ·ΔWᵢ with one float32 rounding of
each cᵢBᵢ (computed in float64) and no cross terms. The result's scale is 1 (α = r per target). A target that
only some adapters have gets only their blocks; negative weights are plain negative cᵢ.

``svd``: the same sum, factored without forming ΔW (QR of B and Aᵀ, then the SVD of the small core, all in
float64), truncated to its K largest singular values: B = U_K·√Σ_K, A = √Σ_K·V_Kᵀ. Reported per target: the
spectral error ‖ΔW − ΔW_K‖₂ = σ_{K+1} and the relative Frobenius error ‖ΔW − ΔW_K‖_F / ‖ΔW‖_F (both on the
float64 sum, before the float32 rounding of the factors).

DoRA adapters are refused: each normalizes its own W₀ + ΔWᵢ, so their sum is no LoRA. VeRA adapters take part
through their compiled targets (exactly the ΔW that merge applies), once bound to layer sizes. Full replacement
tensors (bias, modules_to_save) cannot be summed: refused.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import AdapterError, ConfigError
from .adapter import Adapter, LoraTarget
from .config import LoraConfig

METHODS = ("cat", "svd")


@dataclass
class CombineResult:
    """The combined adapter and, for ``svd``, the truncation error per target (module path as in PEFT)."""

    adapter: Adapter
    method: str
    weights: list[float]
    targets: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "weights": list(self.weights),
            "ranks": sorted({t.rank for t in self.adapter.targets.values()}),
            "targets": self.targets,
        }


def combine_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    *,
    method: str = "cat",
    rank: int | None = None,
    name: str = "combined",
) -> CombineResult:
    """One adapter computing Σ wᵢ·ΔWᵢ (see the module docstring); ``weights`` default to 1 each."""
    adapters = list(adapters)
    if not adapters:
        raise ConfigError("combine needs at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s): give one weight per adapter")
    if not all(np.isfinite(weights)):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: pick one of {', '.join(METHODS)}")
    if method == "svd" and (rank is None or rank < 1):
        raise ConfigError("--method svd needs --rank K (K >= 1)")
    if method == "cat" and rank is not None:
        raise ConfigError("--rank applies to --method svd only (cat keeps every rank: the sum is exact)")
    for a in adapters:
        _check_combinable(a)
    paths = sorted({p for a in adapters for p in a.targets})
    targets: dict[str, LoraTarget] = {}
    report: dict[str, dict] = {}
    for path in paths:
        parts = [(a.targets[path], w) for a, w in zip(adapters, weights) if path in a.targets and w != 0.0]
        first = next(a.targets[path] for a in adapters if path in a.targets)
        for t, _ in parts:
            _check_same_module(first, t)
        if not parts:  # every adapter that has it weighs 0: ΔW = 0, kept as one zero block of rank 1
            parts = [(first, 0.0)]
        a_cat, b_cat = _cat(parts)
        if method == "cat":
            targets[path] = dataclasses.replace(
                first, A=a_cat.astype(np.float32), B=b_cat.astype(np.float32), scale=1.0
            )
        else:
            t, errors = _truncate(first, a_cat, b_cat, rank)
            targets[path] = t
            report[path] = errors
    fan = {t.fan_in_fan_out for t in targets.values() if t.kind == "linear"}
    if len(fan) > 1:
        raise AdapterError("the adapters mix fan_in_fan_out layouts (HF Conv1D and Linear): one config cannot say both")
    config = _config(targets, fan_in_fan_out=fan.pop() if fan else False)
    return CombineResult(Adapter(targets=targets, config=config, name=name), method, weights, report)


def _check_combinable(a: Adapter) -> None:
    if a.is_dora:
        raise AdapterError(
            f"adapter {a.name!r} is DoRA: each DoRA adapter normalizes its own W₀ + ΔW, so a weighted sum of them is "
            "no LoRA; merge them one at a time instead"
        )
    if a.vera is not None and not a.vera.bound:
        raise AdapterError(
            f"adapter {a.name!r} is VeRA: its ΔW slices the shared projections by each layer's input size, which "
            "only the model knows; merge or inject it on its own (an Adapter bound to the model combines exactly)"
        )
    if a.extra:
        raise AdapterError(
            f"adapter {a.name!r} replaces full tensors ({', '.join(sorted(a.extra)[:3])}): replacements cannot be "
            "summed; combine adapters without bias/modules_to_save"
        )
    for t in a:
        if t.kind == "conv" and t.groups != 1:
            raise AdapterError(f"{t.name}: LoRA on a grouped convolution cannot be combined (its B is per group)")


def _check_same_module(a: LoraTarget, b: LoraTarget) -> None:
    if (a.kind, a.weight_shape, a.fan_in_fan_out) != (b.kind, b.weight_shape, b.fan_in_fan_out):
        raise AdapterError(
            f"{a.name}: the adapters disagree about this module ({a.kind} {a.weight_shape} vs {b.kind} "
            f"{b.weight_shape}): adapters for different models?"
        )


def _cat(parts: list[tuple[LoraTarget, float]]) -> tuple[np.ndarray, np.ndarray]:
    """[A₁; A₂; ...] and [c₁B₁, c₂B₂, ...] in float64 (cᵢ = wᵢ·sᵢ); B·A = Σ cᵢBᵢAᵢ."""
    a = np.concatenate([np.asarray(t.A, np.float64) for t, _ in parts], axis=0)
    b = np.concatenate([np.asarray(t.B, np.float64) * (w * t.scale) for t, w in parts], axis=1)
    return a, b


def _truncate(first: LoraTarget, a: np.ndarray, b: np.ndarray, k: int) -> tuple[LoraTarget, dict]:
    """The rank-K truncation of B·A (float64) as a LoRA target of scale 1, and its errors."""
    out, r = b.shape[0], a.shape[0]
    a2 = a.reshape(r, -1)  # conv: the kernel flattened
    b2 = b.reshape(out, r)
    qb, rb = np.linalg.qr(b2)
    qa, ra = np.linalg.qr(a2.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    keep = min(k, len(s))
    root = np.sqrt(s[:keep])
    new_b = (qb @ u[:, :keep]) * root
    new_a = (root[:, None] * vt[:keep]) @ qa.T
    total = float(np.sqrt(np.sum(s**2)))
    rest = s[keep:]
    errors = {
        "rank": int(keep),
        "spectral_error": float(rest[0]) if rest.size else 0.0,
        "relative_error": float(np.sqrt(np.sum(rest**2)) / total) if total > 0 else 0.0,
    }
    if keep == 0 or total == 0:
        new_a, new_b, keep = np.zeros((1, a2.shape[1])), np.zeros((out, 1)), 1
        errors["rank"] = 1
    new_a = new_a.reshape(keep, *a.shape[1:])
    new_b = new_b.reshape(out, keep, *b.shape[2:])
    t = dataclasses.replace(first, A=new_a.astype(np.float32), B=new_b.astype(np.float32), scale=1.0, magnitude=None)
    return t, errors


def _config(targets: dict[str, LoraTarget], *, fan_in_fan_out: bool) -> LoraConfig:
    """PEFT's config for scale 1 everywhere: α = r per target (r: the commonest rank, patterns for the rest)."""
    ranks = Counter(t.rank for t in targets.values())
    r = ranks.most_common(1)[0][0]
    # Patterns are regexes matched against a dotted suffix of the module path: escape the whole path.
    pattern = {re.escape(p): t.rank for p, t in targets.items() if t.rank != r}
    return LoraConfig(
        r=r,
        lora_alpha=float(r),
        target_modules=sorted(targets),
        rank_pattern=pattern,
        alpha_pattern={k: float(v) for k, v in pattern.items()},
        fan_in_fan_out=fan_in_fan_out,
    )

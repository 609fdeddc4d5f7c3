"""LoraConfig: which modules get LoRA, at what rank and scale; PEFT's adapter_config.json both ways."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError
from ..safejson import short_repr
from .patterns import check_pattern, full_match, suffix_match

INIT_CHOICES = ("default", "gaussian")
# PEFT's initialisations that rewrite the base weight to W − s·B₀A₀ when the adapter is created: an adapter
# saved from them without PEFT's conversion belongs to that residual base, not to the model's own weights.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga")
# PEFT's other initialisations leave the base as it is: at inference they are plain LoRA.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
CONVERT_INIT_HINT = "lora-export convert-init ADAPTER --initial INITIAL_ADAPTER -o OUT"
BIAS_CHOICES = ("none", "all", "lora_only")
# A rank is a tensor dimension; beyond this, α/r and √r would overflow floats long before any tensor fits.
MAX_RANK = 2**31 - 1


@dataclass
class LoraConfig:
    """Configuration of a LoRA adapter (field names follow PEFT's LoraConfig).

    target_modules: a list of module names or name suffixes, a regex string matched against the whole
    module path, or ``"all-linear"`` (every Linear/Conv1D except the output head).
    rank_pattern / alpha_pattern: ``{pattern: value}`` overrides, patterns matched as PEFT does
    (a suffix of the module path, regex allowed).
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 0 < self.r <= MAX_RANK:
            raise ConfigError(f"r must be a positive integer (at most {MAX_RANK}), got {_short(self.r)}")
        for what in ("target_modules", "exclude_modules", "modules_to_save"):
            spec = getattr(self, what)
            if not (
                spec is None
                or (isinstance(spec, str) and what != "modules_to_save")
                or (isinstance(spec, list) and all(isinstance(t, str) for t in spec))
            ):
                raise ConfigError(f"{what} must be a list of module names, a regex string or null, got {_short(spec)}")
        for what in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, what), dict):
                raise ConfigError(f"{what} must be an object, got {_short(getattr(self, what))}")
        # Pattern keys are regexes (PEFT's get_pattern_key): a bad one must fail here, not mid-merge.
        for what in ("rank_pattern", "alpha_pattern"):
            for pat in getattr(self, what):
                check_pattern(pat, f"{what} key", suffix=True)
        for pat, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= MAX_RANK:
                raise ConfigError(f"rank_pattern[{pat!r}] must be an integer in [1, {MAX_RANK}], got {_short(rank)}")
        for pat, alpha in self.alpha_pattern.items():
            if not _is_finite(alpha):
                raise ConfigError(f"alpha_pattern[{pat!r}] must be a finite number, got {_short(alpha)}")
        for what in ("lora_alpha", "lora_dropout"):
            if not _is_finite(getattr(self, what)):
                raise ConfigError(f"{what} must be a finite number, got {_short(getattr(self, what))}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {_short(self.lora_dropout)}")
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"init must be one of {', '.join(INIT_CHOICES)}, got {_short(self.init)}")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {', '.join(BIAS_CHOICES)}, got {_short(self.bias)}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            check_pattern(self.target_modules, "target_modules")
        if isinstance(self.exclude_modules, str):
            check_pattern(self.exclude_modules, "exclude_modules")

    # -- per-module resolution -------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        """Rank of the module at path ``name``."""
        key = _pattern_key(self.rank_pattern, name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, name: str) -> float:
        key = _pattern_key(self.alpha_pattern, name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scale_for(self, name: str) -> float:
        """Resolved scale s in W + s·BA: α/r, or α/√r with rsLoRA."""
        return resolved_scale(self.alpha_for(name), self.rank_for(name), self.use_rslora)

    def is_target(self, name: str) -> bool:
        """Whether the module path ``name`` matches target_modules and not exclude_modules.

        ``"all-linear"`` is resolved against the model by the caller (it depends on module types).
        """
        if self.exclude_modules and _matches(self.exclude_modules, name):
            return False
        # PEFT's rf"(^|.*\.){re.escape(m)}($|\..*)": m is a run of whole path components.
        if self.modules_to_save and any(f".{m}." in f".{name}." for m in self.modules_to_save):
            return False
        if self.target_modules is None or self.target_modules == "all-linear":
            return False
        return _matches(self.target_modules, name)

    # -- PEFT's adapter_config.json ----------------------------------------------------------
    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The adapter_config.json that PEFT's ``PeftModel.from_pretrained`` reads."""
        target = self.target_modules
        if isinstance(target, list):
            target = sorted(target)
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": target,
            "exclude_modules": self.exclude_modules,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": True if self.init == "default" else self.init,
            "bias": self.bias,
            "modules_to_save": self.modules_to_save,
            "fan_in_fan_out": self.fan_in_fan_out,
            "layers_to_transform": None,
            "layers_pattern": None,
            "lora_bias": False,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Parse PEFT's adapter_config.json (a LORA config); refuse features we cannot honour."""
        if not isinstance(d, dict):
            raise ConfigError("adapter_config.json must hold a JSON object")
        peft_type = d.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise ConfigError(f"adapter type {_short(peft_type)} is not supported (only LORA)")
        if d.get("lora_bias"):
            raise ConfigError("lora_bias=True adapters are not supported")
        if d.get("layers_to_transform") not in (None, [], ""):
            raise ConfigError("layers_to_transform is not supported; list the target modules instead")
        if d.get("target_parameters"):
            raise ConfigError("target_parameters (LoRA on raw parameters) is not supported")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(d.get(key) or {}, dict):
                raise ConfigError(f"invalid adapter_config.json: {key} must be an object, got {type(d[key]).__name__}")
        init = peft_init(d.get("init_lora_weights", True))
        return cls(
            r=_as_int(d.get("r", 8), "r"),
            lora_alpha=_as_float(d.get("lora_alpha", 8), "lora_alpha"),
            lora_dropout=_as_float(d.get("lora_dropout") or 0.0, "lora_dropout"),
            target_modules=d.get("target_modules"),
            exclude_modules=d.get("exclude_modules"),
            rank_pattern={k: _as_int(v, f"rank_pattern[{k!r}]") for k, v in (d.get("rank_pattern") or {}).items()},
            alpha_pattern={k: _as_float(v, f"alpha_pattern[{k!r}]") for k, v in (d.get("alpha_pattern") or {}).items()},
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=bool(d.get("use_dora", False)),
            init=init,
            bias=d.get("bias") or "none",
            modules_to_save=d.get("modules_to_save"),
            fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def base_mutating_init(value: Any) -> str | None:
    """The PEFT init (``pissa``, ``olora``, ...) when ``init_lora_weights`` rewrote the base weights, else None."""
    if isinstance(value, str):
        low = value.lower()
        return next((kind for kind in BASE_MUTATING_INITS if low == kind or low.startswith(f"{kind}_")), None)
    return None


def peft_init(value: Any) -> str:
    """Our ``init`` for PEFT's ``init_lora_weights``; refuses inits whose adapter does not fit the untouched base.

    PiSSA, OLoRA, CorDA and LoRA-GA subtract s·B₀A₀ from the base weight when the adapter is created, so
    the saved A, B only make sense on that residual base (PEFT's converted form is plain LoRA at rank 2r,
    saved with init_lora_weights=true). LoftQ replaces the base by its quantized form.
    """
    kind = base_mutating_init(value)
    if kind is not None:
        raise ConfigError(
            f"init_lora_weights={_short(value)}: this adapter belongs to the base PEFT rewrote as W - s*B0*A0, "
            f"not to the model's own weights; convert it with `{CONVERT_INIT_HINT}` (INITIAL_ADAPTER: the adapter "
            "saved right after initialisation), or save it with PEFT's path_initial_model_for_weight_conversion"
        )
    if value == "loftq":
        raise ConfigError(
            "init_lora_weights='loftq': the adapter belongs to LoftQ's quantized base weights, not the model's own; "
            "not supported"
        )
    if value is True or value is False or value is None:
        return "default"
    if isinstance(value, str) and value.lower() in _PLAIN_INITS:
        return "gaussian" if value.lower() == "gaussian" else "default"
    raise ConfigError(f"init_lora_weights={_short(value)} is not an initialisation lora-export knows; not guessing")


def resolved_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's scale: α/r (Hu et al.), or α/√r for rank-stabilized LoRA (Kalajdzievski 2023)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def closest_names(query: str | Iterable[str], names: Iterable[str], n: int = 3) -> list[str]:
    """Module names most similar to the query: for 'did you mean' in error messages."""
    names = list(names)
    queries = [query] if isinstance(query, str) else list(query)
    leaves = {}
    for name in names:
        leaves.setdefault(name.rsplit(".", 1)[-1], name)
    found: list[str] = []
    for q in queries:
        for hit in difflib.get_close_matches(q, list(leaves), n=n, cutoff=0.4):
            if hit not in found:
                found.append(hit)
        for hit in difflib.get_close_matches(q, names, n=n, cutoff=0.4):
            if hit not in found:
                found.append(hit)
    return found[:n]


def _matches(spec: list[str] | str, name: str) -> bool:
    # PEFT's rule: a string is a regex over the whole path; a list matches exact names or dotted suffixes.
    if isinstance(spec, str):
        return full_match(spec, name)
    return name in spec or any(name.endswith(f".{t}") for t in spec)


def _pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    # PEFT's get_pattern_key: the first pattern that matches a dotted suffix of the path.
    for key in patterns:
        if suffix_match(key, name):
            return key
    return None


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    try:
        return _is_real(value) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _short(value: Any) -> str:
    return short_repr(value)


def _as_int(value: Any, what: str) -> int:
    # JSON numbers only: int("8") or int(8.9) would hide a broken config; 8.0 is 8.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"invalid adapter_config.json: {what} must be an integer, got {_short(value)}")
    return value


def _as_float(value: Any, what: str) -> float:
    if not _is_real(value):
        raise ConfigError(f"invalid adapter_config.json: {what} must be a number, got {_short(value)}")
    if not _is_finite(value):
        raise ConfigError(f"invalid adapter_config.json: {what} must be finite, got {_short(value)}")
    return float(value)

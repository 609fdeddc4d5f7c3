"""VeRA (Kopiczko et al., arXiv 2310.11454) in canonical, torch-free form: config, shared projections, λ vectors.

VeRA freezes one pair of random matrices for the whole model, A (r, max_in) and B (max_out, r), generated
from ``projection_prng_key`` and sized for the largest adapted layer, and trains per layer two vectors:
λ_d (r,) and λ_b (out,). A layer with in/out features uses the slices A[:, :in] and B[:out, :]:

    ΔW = Λ_b·B[:out]·Λ_d·A[:, :in]

Every VeRA target compiles to a plain canonical LoRA target with scale 1,
B′ = Λ_b·B[:out], A′ = Λ_d·A[:, :in] (float32, PEFT's own merge product), so merge needs no VeRA code.
The ``VeraRecord`` on ``Adapter.vera`` keeps the structure for inject's vector-only slots.

A PEFT file holds the λ vectors (and, with ``save_projection``, A and B) but not the layers' input sizes:
until a model says them, the targets are *unbound* placeholders whose A′ has width 0 (no weight has that
shape, so nothing can merge them by accident). ``bind`` compiles them from the input sizes: the training
code takes them from the torch modules, the ONNX stages from the graph (``graph/slots/vera``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import AdapterError, ConfigError, ShapeError
from .adapter import Adapter, LoraTarget
from .config import LoraConfig, _as_float, _as_int

VERA_BIAS = {"none": "none", "all": "all", "vera_only": "lora_only"}


@dataclass
class VeraConfig(LoraConfig):
    """A VeRA adapter's configuration, PEFT's ``VeraConfig`` fields (``r`` one rank for all layers).

    ``projection_prng_key`` seeds the shared A/B (PEFT's kaiming-uniform with a torch Generator);
    ``save_projection`` stores them in the adapter file; ``vera_dropout`` drops the input of the branch;
    ``d_initial`` starts λ_d (λ_b starts at 0, so the layer starts unchanged). bias: none, all, vera_only.
    LoRA's own knobs (alpha, rank/alpha patterns, rsLoRA, DoRA) do not exist in VeRA: its scale is 1.
    """

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        if self.bias == "vera_only":
            self.bias = "lora_only"
        if self.rank_pattern or self.alpha_pattern or self.use_rslora or self.use_dora:
            raise ConfigError(
                "VeRA has one rank and no alpha: rank_pattern, alpha_pattern, rsLoRA and DoRA do not apply"
            )
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < 2**63:
            raise ConfigError(f"projection_prng_key must be a non-negative integer, got {key!r}")
        if not isinstance(self.d_initial, (int, float)) or not math.isfinite(self.d_initial):
            raise ConfigError(f"d_initial must be a finite number, got {self.d_initial!r}")
        self.lora_dropout = self.vera_dropout
        super().__post_init__()
        self.lora_alpha = float(self.r)  # scale r/r = 1: VeRA's λ vectors carry all of it

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The adapter_config.json that PEFT's ``PeftModel.from_pretrained`` reads (``peft_type: VERA``)."""
        target = sorted(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        return {
            "peft_type": "VERA",
            "task_type": None,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
            "r": self.r,
            "target_modules": target,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": self.save_projection,
            "vera_dropout": self.vera_dropout,
            "d_initial": self.d_initial,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": "vera_only" if self.bias == "lora_only" else self.bias,
            "modules_to_save": self.modules_to_save,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> VeraConfig:
        """Parse PEFT's VERA adapter_config.json; refuse what we cannot honour."""
        if d.get("layers_to_transform") not in (None, [], ""):
            raise ConfigError("layers_to_transform is not supported; list the target modules instead")
        bias = d.get("bias") or "none"
        if bias not in VERA_BIAS:
            raise ConfigError(f"invalid VeRA adapter_config.json: bias must be one of {', '.join(VERA_BIAS)}")
        return cls(
            r=_as_int(d.get("r", 256), "r"),
            target_modules=d.get("target_modules"),
            projection_prng_key=_as_int(d.get("projection_prng_key", 0), "projection_prng_key"),
            save_projection=bool(d.get("save_projection", True)),
            vera_dropout=_as_float(d.get("vera_dropout") or 0.0, "vera_dropout"),
            d_initial=_as_float(d.get("d_initial", 0.1), "d_initial"),
            fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
            bias=VERA_BIAS[bias],
            modules_to_save=d.get("modules_to_save"),
        )


@dataclass(frozen=True, eq=False)
class VeraProjection:
    """The shared frozen pair: A (r, max_in), B (max_out, r), float32, and the key that generated them."""

    key: int
    A: np.ndarray
    B: np.ndarray

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1] or self.A.shape[0] == 0:
            raise ShapeError(f"VeRA projections need A (r, in) and B (out, r), got {self.A.shape} and {self.B.shape}")

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    @property
    def max_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def max_out(self) -> int:
        return int(self.B.shape[0])

    def digest(self) -> str:
        """sha256 (hex) of A and B (float32 values and shapes): the identity a VeRA-injected model keeps."""
        h = hashlib.sha256(b"lora-export vera projection v1\n")
        for arr in (self.A, self.B):
            arr = np.ascontiguousarray(arr, dtype="<f4")
            h.update(np.asarray(arr.shape, dtype="<u8").tobytes() + arr.tobytes())
        return h.hexdigest()


@dataclass(frozen=True, eq=False)
class VeraVectors:
    """One layer's trained vectors: λ_d (r,), λ_b (out,)."""

    lambda_d: np.ndarray
    lambda_b: np.ndarray


@dataclass(frozen=True, eq=False)
class VeraRecord:
    """What makes an Adapter VeRA: the shared projection (None until bound when the file lacks it), the
    λ vectors per target path, and each target's input size once bound."""

    key: int
    r: int
    vectors: dict[str, VeraVectors]
    projection: VeraProjection | None = None
    in_features: dict[str, int] = field(default_factory=dict)
    save_projection: bool = True

    @property
    def bound(self) -> bool:
        return self.projection is not None and all(p in self.in_features for p in self.vectors)


def generate_projection(key: int, r: int, max_in: int, max_out: int) -> VeraProjection:
    """A and B exactly as PEFT's ``VeraModel._init_vera_A_vera_B``: one CPU torch Generator seeded with
    ``key``, kaiming-uniform A (r, max_in) first, then B (max_out, r), float32. Needs torch."""
    try:
        import torch
    except ImportError:
        raise AdapterError(
            "regenerating VeRA projections from projection_prng_key needs torch: pip install 'lora-export[train]'"
        ) from None
    generator = torch.Generator(device="cpu").manual_seed(int(key))

    def kaiming(shape: tuple[int, int]) -> np.ndarray:
        # PEFT's _kaiming_init: fan_in of a 2-D tensor is its second dimension, gain √2, bound √3·std.
        std = math.sqrt(2) / math.sqrt(shape[1])
        bound = math.sqrt(3.0) * std
        with torch.no_grad():
            t = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        return t.numpy().copy()

    a = kaiming((int(r), int(max_in)))
    return VeraProjection(int(key), a, kaiming((int(max_out), int(r))))


def vera_target(
    name: str, projection: VeraProjection, vectors: VeraVectors, in_features: int, fan_in_fan_out: bool
) -> LoraTarget:
    """The canonical LoRA target of one VeRA layer: A′ = Λ_d·A[:, :in], B′ = Λ_b·B[:out], scale 1 (float32)."""
    out = int(vectors.lambda_b.shape[0])
    if vectors.lambda_d.shape != (projection.r,):
        raise ShapeError(
            f"{name}: vera_lambda_d has shape {vectors.lambda_d.shape}, the projections' rank is {projection.r}"
        )
    if in_features > projection.max_in or out > projection.max_out:
        raise ShapeError(
            f"{name}: a layer of {in_features} → {out} features exceeds the VeRA projections "
            f"({projection.max_in} → {projection.max_out})"
        )
    d = np.asarray(vectors.lambda_d, dtype=np.float32)[:, None]
    b = np.asarray(vectors.lambda_b, dtype=np.float32)[:, None]
    a_p = d * np.asarray(projection.A[:, :in_features], dtype=np.float32)
    b_p = b * np.asarray(projection.B[:out, :], dtype=np.float32)
    return LoraTarget(name=name, kind="linear", A=a_p, B=b_p, scale=1.0, fan_in_fan_out=fan_in_fan_out)


def placeholder_target(name: str, vectors: VeraVectors, r: int, fan_in_fan_out: bool) -> LoraTarget:
    """An unbound target: B′ sized (out, r), A′ of width 0, which fits no weight until ``bind``."""
    out = int(vectors.lambda_b.shape[0])
    zeros = np.zeros
    return LoraTarget(name, "linear", zeros((r, 0), np.float32), zeros((out, r), np.float32), 1.0, None, fan_in_fan_out)


def bind(adapter: Adapter, in_features: Mapping[str, int]) -> Adapter:
    """``adapter`` with its VeRA targets compiled for the given layer input sizes (by target path).

    A no-op for plain LoRA adapters and bound VeRA ones. Targets without a size stay unbound placeholders
    (they fit no weight, so the ONNX stages treat them as not found: absent with proof, else an error).
    Without stored projections the sizes of every layer are needed: PEFT sizes A for the largest of them.
    """
    rec = adapter.vera
    if rec is None or rec.bound:
        return adapter
    projection = rec.projection
    if projection is None:
        missing = [p for p in rec.vectors if p not in in_features]
        if missing:
            raise AdapterError(
                f"adapter {adapter.name!r}: VeRA saved without its projections (save_projection=false): "
                f"regenerating them needs every layer's size, unknown for {', '.join(missing[:4])}"
            )
        max_in = max(int(in_features[p]) for p in rec.vectors)
        max_out = max(int(v.lambda_b.shape[0]) for v in rec.vectors.values())
        projection = generate_projection(rec.key, rec.r, max_in, max_out)
    sizes = {p: int(in_features[p]) for p in adapter.targets if p in in_features}
    targets = {
        p: vera_target(p, projection, rec.vectors[p], sizes[p], t.fan_in_fan_out) if p in sizes else t
        for p, t in adapter.targets.items()
    }
    record = dataclasses.replace(rec, projection=projection, in_features={**rec.in_features, **sizes})
    return dataclasses.replace(adapter, targets=targets, vera=record)


def projection_entry(projection: VeraProjection) -> dict[str, Any]:
    """What an injected model's slot manifest records about its shared projections."""
    return {
        "key": projection.key,
        "r": projection.r,
        "max_in": projection.max_in,
        "max_out": projection.max_out,
        "sha256": projection.digest(),
    }


def peft_tensors(adapter: Adapter) -> dict[str, np.ndarray]:
    """A VeRA adapter's tensors under PEFT's keys: ``base_model.model.<path>.vera_lambda_d``/``_b`` per target
    and, with ``save_projection``, the shared ``base_model.vera_A``/``vera_B``."""
    rec = adapter.vera
    if rec is None:
        raise AdapterError(f"adapter {adapter.name!r} is not a VeRA adapter")
    out: dict[str, np.ndarray] = {}
    for path in adapter.targets:
        vec = rec.vectors[path]
        out[f"base_model.model.{path}.vera_lambda_d"] = np.asarray(vec.lambda_d, dtype=np.float32)
        out[f"base_model.model.{path}.vera_lambda_b"] = np.asarray(vec.lambda_b, dtype=np.float32)
    if rec.save_projection:
        if rec.projection is None:
            raise AdapterError(f"adapter {adapter.name!r}: VeRA projections unknown (bind it to a model first)")
        out["base_model.vera_A"] = rec.projection.A
        out["base_model.vera_B"] = rec.projection.B
    return out

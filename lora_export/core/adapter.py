"""The canonical, torch-free adapter: the seam between training and ONNX deployment.

Every LoRA variant compiles to this: per target module, A and B in PEFT's tensor layout, a resolved
scale (α/r, α/√r, ...), and an optional DoRA magnitude. The ONNX stages consume nothing else.

Tensor layouts (PEFT's, so files round-trip unchanged):
  linear    A (r, in)           B (out, r)            ΔW (out, in)
  conv      A (r, in, *k)       B (out, r/groups, *1) ΔW (out, in, *k)   (groups == 1 only)
  embedding A (r, num)          B (dim, r)            ΔW (num, dim)
ΔW is in the torch module's own weight layout; ``fan_in_fan_out`` says the torch weight is stored
transposed (HF Conv1D). DoRA magnitude is 1-D: one entry per output channel (per embedding dim).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import AdapterError, ShapeError, TargetError
from ..safejson import short_repr
from .config import LoraConfig
from .delta import lora_delta
from .patterns import search

if TYPE_CHECKING:
    from .vera import VeraRecord

KINDS = ("linear", "conv", "embedding")


@dataclass(frozen=True, eq=False)
class LoraTarget:
    """One adapted module: ΔW = scale · B·A in the module's weight layout."""

    name: str
    kind: str
    A: np.ndarray
    B: np.ndarray
    scale: float
    magnitude: np.ndarray | None = None
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ShapeError(f"{self.name}: unknown target kind {self.kind!r}")
        a, b = self.A, self.B
        want_ndim = 2 if self.kind != "conv" else None
        if want_ndim and (a.ndim != 2 or b.ndim != 2):
            raise ShapeError(f"{self.name}: {self.kind} LoRA needs 2-D A and B, got {a.shape} and {b.shape}")
        if self.kind == "conv":
            if a.ndim < 3 or b.ndim != a.ndim or any(s != 1 for s in b.shape[2:]):
                raise ShapeError(
                    f"{self.name}: conv LoRA needs A (r, in, *k) and B (out, r, 1...), got {a.shape} and {b.shape}"
                )
        r = a.shape[0]
        if r == 0 or b.shape[1] == 0 or r % b.shape[1] != 0 or (self.kind != "conv" and b.shape[1] != r):
            raise ShapeError(f"{self.name}: A and B ranks disagree (A {a.shape}, B {b.shape})")
        if self.magnitude is not None and self.magnitude.shape != (b.shape[0],):
            raise ShapeError(f"{self.name}: DoRA magnitude has shape {self.magnitude.shape}, expected ({b.shape[0]},)")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def groups(self) -> int:
        """Convolution groups of the B branch (PEFT's grouped-conv LoRA); 1 otherwise."""
        return self.rank // int(self.B.shape[1])

    @property
    def out_features(self) -> int:
        """Output channels (linear, conv) or the embedding dimension."""
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        """Input features (linear), input channels (conv) or the vocabulary size (embedding)."""
        return int(self.A.shape[1])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of ΔW, the torch weight's layout (before fan_in_fan_out)."""
        if self.kind == "embedding":
            return (self.in_features, self.out_features)
        # A grouped conv's kernel holds in/groups channels (PEFT's lora_B carries the base's groups).
        return (self.out_features, self.in_features // self.groups, *self.A.shape[2:])

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def delta(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """ΔW = scale·B·A in the module's weight layout, computed in ``dtype``."""
        return lora_delta(self, dtype)

    def scaled(self, factor: float) -> LoraTarget:
        return dataclasses.replace(self, scale=self.scale * float(factor))


@dataclass(eq=False)
class Adapter:
    """A whole adapter: its targets by module path, its config, and full replacement tensors.

    ``extra`` holds tensors that replace base parameters outright (trained biases with
    ``bias="all"|"lora_only"``, ``modules_to_save``), keyed by parameter path (``classifier.weight``).
    ``stored_base`` holds base weights saved beside the LoRA tensors (PEFT's ``save_embedding_layers``),
    keyed by target path in the torch layout: a record of the base, never a replacement.
    ``vera`` (VeRA adapters only, see ``vera``): the shared projections and per-target λ vectors that the
    targets were compiled from, kept for inject's vector-only slots; merge reads only the targets.
    ``shared`` names groups of targets that hold one LoRA between them (LoRA-drop): group name → module
    paths, every member with equal A, B, scale, kind and layout. Each member still has its own target
    (merge needs nothing more); adapter mode gives a group one pair of slot inputs, ``<group>.lora_A`` /
    ``<group>.lora_B``, and its files hold that pair once.
    """

    targets: dict[str, LoraTarget]
    config: LoraConfig
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = "adapter"
    stored_base: dict[str, np.ndarray] = field(default_factory=dict)
    vera: VeraRecord | None = None
    shared: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: module → fingerprint entry of the base weight the adapter was made for (see ``fingerprint``); None:
    #: the adapter carries none (PEFT adapters saved elsewhere). Not part of the digest.
    base_fingerprint: dict[str, dict] | None = None

    def __post_init__(self) -> None:
        if self.shared:
            self.shared = {g: tuple(members) for g, members in self.shared.items()}
            check_shared(self)

    def shared_group(self, module: str) -> str | None:
        """The shared group ``module`` belongs to, or None."""
        for group, members in self.shared.items():
            if module in members:
                return group
        return None

    def __iter__(self):
        return iter(self.targets.values())

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def is_dora(self) -> bool:
        return any(t.is_dora for t in self.targets.values())

    def scaled(self, factor: float) -> Adapter:
        """The same adapter with every scale multiplied by ``factor`` (``--scale``)."""
        if factor == 1.0:
            return self
        return dataclasses.replace(self, targets={k: t.scaled(factor) for k, t in self.targets.items()})

    def select(self, pattern: str | None) -> Adapter:
        """Only the targets (and full tensors) whose path matches ``pattern`` (searched anywhere in it).

        For applying part of an adapter, e.g. its encoder targets to an encoder exported alone.
        """
        if not pattern:
            return self
        targets = {k: t for k, t in self.targets.items() if search(pattern, k, "--only-targets")}
        if not targets:
            raise TargetError(f"--only-targets {pattern!r} matches none of adapter {self.name!r}'s targets")
        shared = {g: tuple(m for m in ms if m in targets) for g, ms in self.shared.items()}
        return dataclasses.replace(
            self,
            targets=targets,
            extra={k: v for k, v in self.extra.items() if search(pattern, k, "--only-targets")},
            stored_base={k: v for k, v in self.stored_base.items() if k in targets},
            shared={g: ms for g, ms in shared.items() if ms},
            base_fingerprint=(
                None
                if self.base_fingerprint is None
                else {k: v for k, v in self.base_fingerprint.items() if k in targets}
            ),
        )

    def digest(self) -> str:
        """sha256 (hex) of the adapter's tensors: see ``adapter_digest``."""
        return adapter_digest(self)

    def check_finite(self) -> None:
        """Refuse NaN or Inf anywhere in the adapter."""

        for t in self.targets.values():
            for what, arr in (("lora_A", t.A), ("lora_B", t.B), ("magnitude", t.magnitude)):
                if arr is not None and not np.isfinite(arr).all():
                    raise AdapterError(f"adapter {self.name!r}: {t.name}.{what} contains NaN or Inf")
            if not np.isfinite(t.scale):
                raise AdapterError(f"adapter {self.name!r}: {t.name} has a non-finite scale")
        for k, arr in self.extra.items():
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr.astype(np.float32)).all():
                raise AdapterError(f"adapter {self.name!r}: {k} contains NaN or Inf")

    def summary(self) -> dict:
        ranks = sorted({t.rank for t in self.targets.values()})
        return {
            "name": self.name,
            "targets": len(self.targets),
            "ranks": ranks,
            "dora": self.is_dora,
            "rslora": self.config.use_rslora,
            "kinds": sorted({t.kind for t in self.targets.values()}),
            "extra_tensors": sorted(self.extra),
            **({"vera_projection_prng_key": self.vera.key} if self.vera is not None else {}),
        }


# PEFT's key prefix for module tensors: a shared group's tensors are stored under its bare name, so a group
# named with it would read (and write) as the LoRA of a module.
PEFT_PREFIX = "base_model.model."


def group_name_problem(group: str, members: tuple[str, ...], targets: Collection[str]) -> str | None:
    """Why ``group`` cannot name a shared group of ``members`` (among ``targets``), or None."""
    if group.startswith(PEFT_PREFIX):
        return f"starts with PEFT's module prefix {PEFT_PREFIX!r}, so its LoRA would read as a module's"
    if group in targets and group not in members:
        return "is the path of a module outside the group, so their LoRA inputs would collide"
    return None


def check_shared(adapter: Adapter) -> None:
    """Refuse shared groups that name unknown targets, overlap, or whose members differ in their LoRA;
    and group names that read as a module's (``group_name_problem``)."""
    seen: dict[str, str] = {}
    for group, members in adapter.shared.items():
        if not isinstance(group, str) or not group or not members:
            raise AdapterError(f"adapter {adapter.name!r}: shared group {group!r} is unnamed or empty")
        problem = group_name_problem(group, members, adapter.targets)
        if problem:
            raise AdapterError(f"adapter {adapter.name!r}: shared group {short_repr(group)} {problem}")
        first = None
        for m in members:
            t = adapter.targets.get(m)
            if t is None:
                raise AdapterError(f"adapter {adapter.name!r}: shared group {group!r} names {m!r}, which is no target")
            if m in seen:
                raise AdapterError(f"adapter {adapter.name!r}: {m} is in two shared groups ({seen[m]}, {group})")
            seen[m] = group
            if first is None:
                first = t
            elif not _same_lora(first, t):
                raise AdapterError(
                    f"adapter {adapter.name!r}: shared group {group!r}: {m} and {first.name} hold different LoRA "
                    "tensors, scales or layouts"
                )


def _same_lora(a: LoraTarget, b: LoraTarget) -> bool:
    return (
        a.kind == b.kind
        and a.fan_in_fan_out == b.fan_in_fan_out
        and a.scale == b.scale
        and a.weight_shape == b.weight_shape
        and a.A.shape == b.A.shape
        and a.B.shape == b.B.shape
        and (a.A is b.A or np.array_equal(a.A, b.A))
        and (a.B is b.B or np.array_equal(a.B, b.B))
    )


DIGEST_VERSION = b"lora-export adapter digest v1\n"


def _target_tensors(name: str, t: LoraTarget) -> list[tuple[str, np.ndarray]]:
    out = [(f"{name}.lora_A", t.A), (f"{name}.lora_B", t.B), (f"{name}.scale", np.float64(t.scale))]
    if t.magnitude is not None:
        out.append((f"{name}.magnitude", t.magnitude))
    out.append((f"{name}.kind:{t.kind}", np.bool_(True)))
    out.append((f"{name}.fan_in_fan_out", np.bool_(t.fan_in_fan_out)))
    return out


def digest_tensors(adapter: Adapter) -> list[tuple[str, np.ndarray]]:
    """The named tensors ``adapter_digest`` hashes, sorted by name.

    Per target ``T``: ``T.lora_A``, ``T.lora_B``, ``T.magnitude`` (DoRA only), ``T.scale`` (float64 scalar:
    the resolved α/r or α/√r) and ``T.kind:<kind>`` / ``T.fan_in_fan_out`` markers (how ΔW is laid out);
    per full replacement tensor ``K``: ``extra:K``. The adapter's name, its config file and ``stored_base``
    (a record of the base, never applied) are not part of it: the same tensors under another folder name
    are the same adapter.
    """
    out = [entry for name, t in adapter.targets.items() for entry in _target_tensors(name, t)]
    out += [(f"extra:{key}", arr) for key, arr in adapter.extra.items()]
    return sorted(out, key=lambda item: item[0])


def adapter_digest(adapter: Adapter) -> str:
    """A stable sha256 over the canonical adapter's tensors (``digest_tensors``), in hex.

    Each tensor contributes its name (UTF-8), dtype name, shape and little-endian C-order bytes, each
    length-prefixed, in sorted name order: equal tensors give an equal digest whatever file they came
    from, and any changed value, dtype, shape or scale changes it.
    """
    return _sha256(digest_tensors(adapter))


def target_digest(t: LoraTarget) -> str:
    """The same digest over one target's entries alone (its module path, A, B, magnitude, scale, layout)."""
    return _sha256(sorted(_target_tensors(t.name, t), key=lambda item: item[0]))


def _sha256(entries: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256(DIGEST_VERSION)
    for name, arr in entries:
        arr = np.asarray(arr)
        if arr.dtype.byteorder not in ("<", "|"):
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        # surrogatepass: a name from a JSON header may hold a lone surrogate (\udcff); it still hashes.
        for field_bytes in (name.encode("utf-8", "surrogatepass"), arr.dtype.name.encode("ascii")):
            h.update(struct.pack("<Q", len(field_bytes)) + field_bytes)
        h.update(struct.pack(f"<Q{arr.ndim}Q", arr.ndim, *arr.shape))
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # C-order bytes, no copy when contiguous
        h.update(struct.pack("<Q", data.size))
        h.update(data)
    return h.hexdigest()

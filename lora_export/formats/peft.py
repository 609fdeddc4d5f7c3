"""PEFT's on-disk adapter format, both ways: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's: ``base_model.model.<path>.lora_A.weight``, ``.lora_B.weight``,
``.lora_embedding_A``, ``.lora_embedding_B``, ``.lora_magnitude_vector``; anything else under the
prefix is a full tensor (trained biases, modules_to_save).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Container
from pathlib import Path

import numpy as np

from .. import safejson
from ..core.adapter import Adapter, LoraTarget
from ..core.config import LoraConfig
from ..core.fingerprint import FINGERPRINT_KEY
from ..core.fingerprint import decode as decode_fingerprint
from ..core.fingerprint import encode as encode_fingerprint
from ..core.vera import peft_tensors
from ..errors import AdapterError, ConfigError
from ..files.atomic import atomic_write_text
from ..files.checks import require_regular_file
from .safetensors import read_safetensors, write_safetensors
from .variants import variant_loader

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_BASE_WEIGHT = ".base_layer.weight"
_LORA_KEY = re.compile(
    r"^(?P<path>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?(?:\.weight)?$"
)


def load_adapter(path: str | os.PathLike, name: str | None = None) -> Adapter:
    """Read an adapter saved by PEFT or by lora-export into the canonical, torch-free form.

    ``path`` is an adapter directory, or a file in it: its ``adapter_config.json``, or its weights
    (``adapter_model.safetensors``) with the config beside it. A pickle-based ``adapter_model.bin`` is
    read only through ``torch.load(weights_only=True)``.
    """
    raw, tensors, name = read_adapter_raw(path, name)
    loader = variant_loader(raw.get("peft_type") if isinstance(raw, dict) else None)
    if loader is not None:
        adapter = loader(raw, tensors, name)
    else:
        adapter = adapter_from_state_dict(tensors, LoraConfig.from_peft_dict(raw), name=name)
    fingerprint = read_base_fingerprint(path)
    if fingerprint is not None:
        adapter.base_fingerprint = {k: v for k, v in fingerprint.items() if k in adapter.targets}
    return adapter


def read_base_fingerprint(path: str | os.PathLike) -> dict[str, dict] | None:
    """The base fingerprint an adapter folder's weights file carries (lora-export's ``save_adapter`` writes
    one; PEFT's does not: None)."""
    directory, path = _adapter_location(Path(path))
    weights = _weights_file(directory, path)
    if weights.suffix != ".safetensors":
        return None
    text = read_safetensors(weights)[1].get(FINGERPRINT_KEY)
    return None if text is None else decode_fingerprint(text, weights)


def _weights_file(directory: Path, path: Path) -> Path:
    if path.is_file():
        return path
    if os.path.lexists(directory / WEIGHTS_NAME):
        return directory / WEIGHTS_NAME
    if os.path.lexists(directory / PICKLE_NAME):
        return directory / PICKLE_NAME
    raise AdapterError(f"{directory}: no {WEIGHTS_NAME} (or {PICKLE_NAME})")


def read_adapter_raw(
    path: str | os.PathLike, name: str | None = None, check_config=None
) -> tuple[object, dict[str, np.ndarray], str]:
    """An adapter folder's parsed adapter_config.json (any JSON value), its tensors, and its name.

    ``check_config(raw)`` runs before the weights are read (the config's errors come first); by
    default, plain LoRA configs are parsed (and refused) there.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter not found: {path}")
    if not path.is_dir():
        require_regular_file(path, "adapter", AdapterError)
    directory, path = _adapter_location(path)
    cfg_path = directory / CONFIG_NAME
    if not os.path.lexists(cfg_path):
        raise AdapterError(f"{directory}: no {CONFIG_NAME} (not a PEFT adapter directory)")
    require_regular_file(cfg_path, "adapter config", AdapterError)
    try:
        raw = safejson.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterError(f"cannot read {cfg_path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if check_config is not None:
        check_config(raw)
    elif variant_loader(raw.get("peft_type") if isinstance(raw, dict) else None) is None:
        LoraConfig.from_peft_dict(raw)

    weights = _weights_file(directory, path)
    require_regular_file(weights, "adapter weights", AdapterError)
    tensors = _read_pickle_safely(weights) if weights.suffix == ".bin" else read_safetensors(weights)[0]
    # abspath, not resolve: "." or "x/.." need a real name (output files are named after it), but a
    # symlinked adapter folder keeps the name the user gave it.
    name = name or Path(os.path.abspath(directory)).name
    return raw, tensors, name


def adapter_files(path: str | os.PathLike) -> list[Path]:
    """The files ``load_adapter(path)`` reads (those that exist), so writers can refuse to overwrite them."""
    directory, path = _adapter_location(Path(path))
    files = [path] if path.is_file() else [directory / WEIGHTS_NAME, directory / PICKLE_NAME]
    return [f for f in (directory / CONFIG_NAME, *files) if f.is_file()]


def _adapter_location(path: Path) -> tuple[Path, Path]:
    """(the adapter directory, the path to read weights from: the directory itself means "find them").

    The config file stands for its directory; any other file is the weights file."""
    if path.is_dir():
        return path, path
    if path.name == CONFIG_NAME:
        return path.parent, path.parent
    if path.suffix == ".json":
        raise AdapterError(f"{path}: not an adapter; give the adapter folder, its {CONFIG_NAME} or its weights file")
    return path.parent, path


def adapter_from_state_dict(tensors: dict[str, np.ndarray], config: LoraConfig, name: str = "adapter") -> Adapter:
    """Group PEFT state-dict keys into LoraTargets; resolve each target's scale from the config."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    extra: dict[str, np.ndarray] = {}
    base_layers: dict[str, tuple[str, np.ndarray]] = {}
    for key in sorted(tensors):
        arr = tensors[key]
        bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _LORA_KEY.match(bare)
        if m is None:
            if ".lora_" in bare:
                raise AdapterError(f"adapter {name!r}: unsupported LoRA tensor {key!r}")
            if bare.endswith(_BASE_WEIGHT):
                base_layers[bare[: -len(_BASE_WEIGHT)]] = (bare, arr)
                continue
            plain = _plain_extra_key(bare, adapter_name=name)
            if plain is not None and (plain not in extra or bare == plain):
                extra[plain] = _upcast(arr)
            continue
        parts.setdefault(m["path"], {})[m["part"]] = arr
    if not parts:
        raise AdapterError(f"adapter {name!r}: no LoRA tensors found")
    targets: dict[str, LoraTarget] = {}
    for path, p in parts.items():
        targets[path] = _target(name, path, p, config)
    # PEFT's default save (save_embedding_layers="auto") stores a targeted embedding's or lm_head's base
    # weight as <path>.base_layer.weight: a record of the base the delta was trained on, not a new weight.
    stored_base = {path: _upcast(arr) for path, (_, arr) in base_layers.items() if path in targets}
    for path, (bare, arr) in base_layers.items():
        if path not in targets:
            extra[_plain_extra_key(bare, adapter_name=name)] = _upcast(arr)
    return Adapter(targets=targets, config=config, extra=extra, name=name, stored_base=stored_base)


def _plain_extra_key(key: str, adapter_name: str) -> str | None:
    """A saved full tensor's path in the unwrapped model, or None for PEFT's copies of the original.

    PEFT saves the bias of a wrapped module as ``<path>.base_layer.bias`` and, with bias="all", may also
    write ``<mod>.modules_to_save.bias`` and ``<mod>.original_module.bias`` beside the trained ``<mod>.bias``.
    """
    parts = key.split(".")
    if "original_module" in parts:
        return None
    out = []
    i = 0
    while i < len(parts):
        if parts[i] == "modules_to_save":
            # "modules_to_save.<adapter>." in a model state dict; bare "modules_to_save." in PEFT's files.
            i += 2 if i + 2 < len(parts) and parts[i + 1] in ("default", adapter_name) else 1
            continue
        if parts[i] != "base_layer":
            out.append(parts[i])
        i += 1
    return ".".join(out)


def _target(adapter: str, path: str, p: dict[str, np.ndarray], config: LoraConfig) -> LoraTarget:
    if "lora_embedding_A" in p or "lora_embedding_B" in p:
        kind, a_key, b_key = "embedding", "lora_embedding_A", "lora_embedding_B"
    else:
        kind, a_key, b_key = "linear", "lora_A", "lora_B"
    missing = [k for k in (a_key, b_key) if k not in p]
    if missing:
        raise AdapterError(f"adapter {adapter!r}: {path} has no {' or '.join(missing)}")
    for part in (a_key, b_key):
        # Integer/bool tensors would silently merge as garbage; a 0-d or 1-d one has no rank axis.
        arr = np.asarray(p[part])
        if not (arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16"):
            raise AdapterError(f"adapter {adapter!r}: {path}.{part} has dtype {arr.dtype}; expected floating point")
        if arr.ndim < 2:
            raise AdapterError(f"adapter {adapter!r}: {path}.{part} has shape {arr.shape}; expected at least 2-D")
    a, b = _upcast(p[a_key]), _upcast(p[b_key])
    if kind == "linear" and a.ndim > 2:
        kind = "conv"
    rank = int(a.shape[0])
    expected = config.rank_for(path)
    if rank != expected:
        raise AdapterError(f"adapter {adapter!r}: {path} has rank {rank} but adapter_config.json says r={expected}")
    mag = p.get("lora_magnitude_vector")
    if mag is not None:
        mag = _upcast(mag).reshape(-1)
    elif config.use_dora:
        raise AdapterError(f"adapter {adapter!r}: use_dora is set but {path} has no lora_magnitude_vector")
    fan_in_fan_out = config.fan_in_fan_out and kind == "linear"
    return LoraTarget(
        name=path,
        kind=kind,
        A=a,
        B=b,
        scale=config.scale_for(path),
        magnitude=mag,
        fan_in_fan_out=fan_in_fan_out,
    )


def _upcast(arr: np.ndarray) -> np.ndarray:
    # fp16/bf16 → fp32 is exact; all later math runs in fp32 (or fp64) and rounds once at the end.
    arr = np.asarray(arr)
    if arr.dtype == np.float64:
        return np.array(arr)
    if arr.dtype.kind in "fV" or str(arr.dtype) == "bfloat16":
        return arr.astype(np.float32)
    return np.array(arr)


def _read_pickle_safely(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise AdapterError(
            f"{path}: refusing a pickle-based adapter without torch's weights_only loader; convert it to safetensors "
            "(or install torch: pip install 'lora-export[train]')"
        ) from None
    try:
        # torch warns about the pickle protocol of files it is about to refuse: our one line says it all.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means we will not unpickle it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{path}: refused to load pickle file (only plain tensors are allowed): {first}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdapterError(f"{path}: not a state dict of tensors")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def save_adapter_files(
    adapter: Adapter, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``adapter`` in PEFT's format (config + safetensors), each file atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS_NAME, adapter_state_dict(adapter), metadata=weights_metadata(adapter))
    cfg = adapter.config.to_peft_dict(base_model_name_or_path)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory


def weights_metadata(adapter: Adapter) -> dict[str, str]:
    """The weights file's ``__metadata__``: PEFT's format tag, and the adapter's base fingerprint if it has one."""
    meta = {"format": "pt"}
    if adapter.base_fingerprint:
        meta[FINGERPRINT_KEY] = encode_fingerprint(adapter.base_fingerprint)
    return meta


def adapter_state_dict(adapter: Adapter) -> dict[str, np.ndarray]:
    """The adapter's tensors under PEFT's keys (every target its own; PEFT's format has no sharing)."""
    # VeRA: λ vectors (and the shared projections), never the compiled A′/B′.
    tensors: dict[str, np.ndarray] = peft_tensors(adapter) if adapter.vera is not None else {}
    for t in adapter.targets.values() if adapter.vera is None else ():
        key = PREFIX + t.name
        if t.kind == "embedding":
            tensors[f"{key}.lora_embedding_A"] = t.A
            tensors[f"{key}.lora_embedding_B"] = t.B
        else:
            tensors[f"{key}.lora_A.weight"] = t.A
            tensors[f"{key}.lora_B.weight"] = t.B
        if t.magnitude is not None:
            mag = t.magnitude
            if t.kind == "conv":
                # PEFT keeps the conv magnitude as (1, out, 1, ...): its norm is taken with keepdim.
                mag = mag.reshape(1, -1, *([1] * (t.A.ndim - 2)))
            tensors[f"{key}.lora_magnitude_vector"] = mag
    for path, w in adapter.stored_base.items():
        tensors[f"{PREFIX}{path}{_BASE_WEIGHT}"] = w
    tensors.update(full_tensor_items(adapter.extra, adapter.targets))
    return tensors


def full_tensor_items(extra: dict[str, np.ndarray], targets: Container[str]) -> dict[str, np.ndarray]:
    """Full replacement tensors under PEFT's keys: a wrapped module's own parameters sit under its base_layer."""
    out = {}
    for k, v in extra.items():
        owner, _, leaf = k.rpartition(".")
        out[PREFIX + (f"{owner}.base_layer.{leaf}" if owner in targets else k)] = v
    return out

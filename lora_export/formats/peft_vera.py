"""PEFT's VeRA adapter files (``peft_type: VERA``) into the canonical Adapter (``vera``).

Keys: ``base_model.model.<path>.vera_lambda_d`` (r,) and ``.vera_lambda_b`` (out,) per layer; with
``save_projection`` the shared ``base_model.vera_A`` (r, max_in) and ``base_model.vera_B`` (max_out, r).
Anything else under the prefix is a full tensor (trained biases, modules_to_save), as for LoRA.

Without stored projections PEFT regenerates them from ``projection_prng_key`` and the model's layer sizes;
so do we, once a model gives the sizes (``vera.bind``). With ``save_projection`` false, projections that
happen to be in the file are ignored, as PEFT ignores them (its projection buffers are not persistent).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..core.adapter import Adapter
from ..core.vera import VeraConfig, VeraProjection, VeraRecord, VeraVectors, placeholder_target
from ..errors import AdapterError
from .peft import PREFIX, _plain_extra_key, _upcast

_LAMBDA = re.compile(r"^(?P<path>.+?)\.vera_lambda_(?P<part>[bd])(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?$")
_PROJECTION = re.compile(r"^base_model\.vera_(?P<part>[AB])(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?$")


def load_vera(raw: dict[str, Any], tensors: dict[str, np.ndarray], name: str) -> Adapter:
    """The registry's loader for ``peft_type: VERA`` (see ``formats.variants``)."""
    config = VeraConfig.from_peft_dict(raw)
    parts: dict[str, dict[str, np.ndarray]] = {}
    shared: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    for key in sorted(tensors):
        arr = tensors[key]
        p = _PROJECTION.match(key)
        if p is not None:
            shared[p["part"]] = _float(name, key, arr, 2)
            continue
        bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _LAMBDA.match(bare)
        if m is not None:
            parts.setdefault(m["path"], {})[m["part"]] = _float(name, key, arr, 1)
            continue
        if "vera_" in bare:
            raise AdapterError(f"adapter {name!r}: unsupported VeRA tensor {key!r}")
        plain = _plain_extra_key(bare, adapter_name=name)
        if plain is not None and (plain not in extra or bare == plain):
            extra[plain] = _upcast(arr)
    if not parts:
        raise AdapterError(f"adapter {name!r}: no VeRA tensors (vera_lambda_d / vera_lambda_b) found")
    vectors = {}
    for path, p in parts.items():
        missing = [f"vera_lambda_{k}" for k in "db" if k not in p]
        if missing:
            raise AdapterError(f"adapter {name!r}: {path} has no {' or '.join(missing)}")
        if p["d"].shape != (config.r,):
            raise AdapterError(
                f"adapter {name!r}: {path}.vera_lambda_d has shape {p['d'].shape} "
                f"but adapter_config.json says r={config.r}"
            )
        vectors[path] = VeraVectors(p["d"], p["b"])
    projection = None
    if config.save_projection:
        if set(shared) != {"A", "B"}:
            raise AdapterError(
                f"adapter {name!r}: save_projection is set but base_model.vera_A / vera_B are not in the file"
            )
        projection = VeraProjection(config.projection_prng_key, shared["A"], shared["B"])
        if projection.r != config.r:
            raise AdapterError(
                f"adapter {name!r}: vera_A has rank {projection.r} but adapter_config.json says r={config.r}"
            )
    record = VeraRecord(
        key=config.projection_prng_key,
        r=config.r,
        vectors=vectors,
        projection=projection,
        save_projection=config.save_projection,
    )
    targets = {p: placeholder_target(p, v, config.r, config.fan_in_fan_out) for p, v in vectors.items()}
    return Adapter(targets=targets, config=config, extra=extra, name=name, vera=record)


def _float(adapter: str, key: str, arr: np.ndarray, ndim: int) -> np.ndarray:
    arr = np.asarray(arr)
    if not (arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16"):
        raise AdapterError(f"adapter {adapter!r}: {key} has dtype {arr.dtype}; expected floating point")
    if arr.ndim != ndim:
        raise AdapterError(f"adapter {adapter!r}: {key} has shape {arr.shape}; expected {ndim}-D")
    return _upcast(arr)

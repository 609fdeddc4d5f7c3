"""``lora-export combine``'s I/O edge: read the adapters, combine (``combine``), publish one PEFT folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..core.combine import CombineResult, combine_adapters
from ..errors import AdapterError
from ..files.atomic import refuse_overwrite
from ..files.inject_folder import refuse_blocked_outputs
from ..files.publish import publish_folder, stage_parent
from ..files.staging import staging_dir
from .peft import CONFIG_NAME, WEIGHTS_NAME, adapter_files, load_adapter, save_adapter_files


def combine_files(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    weights: Sequence[float] | None = None,
    *,
    method: str = "cat",
    rank: int | None = None,
) -> CombineResult:
    """Combine the PEFT adapters at ``paths`` (see ``combine_adapters``) into the PEFT folder ``out_dir``.

    The folder is swapped in whole (files of an old ``out_dir`` other than the adapter's two are kept); on any
    error nothing changes there, and the inputs are only read.
    """
    adapters = [load_adapter(p) for p in paths]
    out_dir = Path(out_dir)
    result = combine_adapters(adapters, weights, method=method, rank=rank, name=out_dir.name or "combined")
    if out_dir.exists() and not out_dir.is_dir():
        raise AdapterError(f"{out_dir} exists and is not a directory")
    outputs = [out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME]
    refuse_blocked_outputs(outputs)
    refuse_overwrite(outputs, [f for p in paths for f in adapter_files(p)])
    dest = Path(os.path.realpath(out_dir)) if out_dir.is_symlink() else out_dir
    with staging_dir(stage_parent(dest)) as stage:
        new = stage / "out"
        save_adapter_files(result.adapter, new)
        publish_folder(new, dest, stage, replaced={p.name for p in outputs}, last=CONFIG_NAME)
    return result

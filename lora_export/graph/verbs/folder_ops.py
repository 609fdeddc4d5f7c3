"""``merge`` and ``inject`` on an export folder of several ONNX files (``model_folder``): each file gets the
targets that belong to it, other files and entries are copied, and the output folder, mirroring the input,
is published in one swap."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from lora_export.core.adapter import Adapter
from lora_export.errors import AdapterError

from .model_folder import (
    FolderPlan,
    adapter_file_name,
    check_folder_output,
    copy_entry,
    data_files_of,
    plan_folder,
    subset,
)

Progress = Callable[[int, int, str], None]


@dataclasses.dataclass
class FolderResult:
    """What a folder merge or inject did: the plan, per written model file its report, the files written."""

    plan: FolderPlan
    reports: dict[str, dict] = dataclasses.field(default_factory=dict)
    copied: list[str] = dataclasses.field(default_factory=list)
    files: list[Path] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "files": self.plan.files,
            "placed": self.plan.to_dict()["placed"],
            "reports": self.reports,
            "copied": self.copied,
            "written": [str(p) for p in self.files],
        }


def _weights(base_weights) -> Mapping[str, np.ndarray] | None:
    if base_weights is None or isinstance(base_weights, Mapping):
        return base_weights
    from lora_export.files.checks import require_regular_file
    from lora_export.formats.safetensors import read_safetensors

    require_regular_file(base_weights, "base weights", AdapterError)
    return read_safetensors(base_weights)[0]


def _copy_rest(folder: Path, new: Path, rewritten: list[str], result: FolderResult) -> None:
    """Everything of ``folder`` the rewritten model files do not replace: other models with their data,
    configs, tokenizers. A data file only the rewritten models read stays behind (they have their own)."""
    kept_models = [f for f in result.plan.files if f not in rewritten]
    needed = data_files_of(folder, kept_models)
    dropped = data_files_of(folder, rewritten) - needed
    for entry in sorted(os.listdir(folder)):
        if entry in rewritten or entry in dropped or entry.startswith(".lora-export"):
            continue
        copy_entry(folder / entry, new / entry)
        result.copied.append(entry)


def _publish(new: Path, out: Path, stage: Path, written: Sequence[str]) -> None:
    from lora_export.files.publish import publish_folder

    from ..model.data_file import is_own_data_name

    old = set(os.listdir(out)) if out.is_dir() else set()
    produced = set(os.listdir(new))
    # Data files an earlier run wrote for these models are stale; the user's other files stay.
    stale = {n for n in old - produced if any(is_own_data_name(m, n) for m in written)}
    publish_folder(new, out, stage, replaced=produced, stale=stale)


def _write_folder(
    folder: Path,
    out_dir: Path,
    result: FolderResult,
    rewritten: list[str],
    write: Callable[[str, Path], dict],
    progress: Progress | None,
    finish: Callable[[Path], None] | None = None,
) -> FolderResult:
    """Build the output folder beside ``out_dir``: ``write(file, new)`` per rewritten model file, the rest
    copied, ``finish(new)`` last; then publish it in one swap."""
    from lora_export.files.publish import stage_parent
    from lora_export.files.staging import staging_dir

    with staging_dir(stage_parent(out_dir)) as stage:
        new = stage / "out"
        new.mkdir()
        for i, f in enumerate(rewritten):
            if progress is not None:
                progress(i, len(rewritten), f)
            result.reports[f] = write(f, new)
        _copy_rest(folder, new, rewritten, result)
        if finish is not None:
            finish(new)
        if progress is not None:
            progress(len(rewritten), len(rewritten), "")
        result.files = [out_dir / n for n in sorted(os.listdir(new))]
        _publish(new, out_dir, stage, rewritten)
    return result


def merge_folder(
    folder: str | os.PathLike,
    adapter: Adapter | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_weights=None,
    scale: float = 1.0,
    allow_partial: bool = False,
    only_targets: str | None = None,
    force: bool = False,
    requantize: bool = False,
    into_float: bool = False,
    progress: Progress | None = None,
) -> FolderResult:
    """Merge ``adapter`` into the export folder ``folder``, writing the folder ``out_dir``: the files that
    hold targets merged (``merge_file``), the others copied as they are."""
    from lora_export.formats.peft import load_adapter

    from .merge import merge_file

    folder, out_dir = Path(folder), Path(out_dir)
    check_folder_output(folder, out_dir)
    a = (adapter if isinstance(adapter, Adapter) else load_adapter(adapter)).select(only_targets)
    weights = _weights(base_weights)
    plan = plan_folder(folder, [a], base_weights=weights, allow_partial=allow_partial)
    rewritten = [f for f in plan.files if plan.placed[f].get(a.name)]

    def write(f: str, new: Path) -> dict:
        report = merge_file(
            folder / f,
            subset(a, plan.placed[f][a.name]),
            new / f,
            base_weights=weights,
            scale=scale,
            force=force,
            requantize=requantize,
            into_float=into_float,
        )
        return report.to_dict()

    return _write_folder(folder, out_dir, FolderResult(plan), rewritten, write, progress)


def inject_folder(
    folder: str | os.PathLike,
    adapter_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    names: Sequence[str | None] | None = None,
    base_weights=None,
    dora: bool = False,
    only_targets: str | None = None,
    progress: Progress | None = None,
) -> FolderResult:
    """Inject slots into each file of ``folder`` that holds targets of the adapters, writing ``out_dir``:
    those files injected (same names), per adapter and file ``<adapter>.<file stem>.onnx_adapter`` and
    ``.safetensors``, the other entries copied. ``runtime.folder_session.LoraFolderSession`` serves it."""
    from lora_export.files.inject_folder import FILES_MANIFEST, check_adapter_name, write_files_manifest
    from lora_export.formats.adapter_files import write_adapter_tensors
    from lora_export.formats.peft import load_adapter

    from ..model.model_io import load_model, save_model
    from ..targets.genai_names import read_genai_config
    from .inject import inject_adapters

    folder, out_dir = Path(folder), Path(out_dir)
    check_folder_output(folder, out_dir)
    names = list(names) if names is not None else [None] * len(adapter_paths)
    adapters = [load_adapter(p, name=n).select(only_targets) for p, n in zip(adapter_paths, names)]
    for a in adapters:
        check_adapter_name(a.name, " (name it with NAME=PATH)")
    if len({a.name for a in adapters}) != len(adapters):
        raise AdapterError("two adapters have the same name: name them with NAME=PATH")
    weights = _weights(base_weights)
    plan = plan_folder(folder, adapters, base_weights=weights)
    rewritten = [f for f in plan.files if plan.placed[f]]

    def write(f: str, new: Path) -> dict:
        model = load_model(folder / f)
        subs = [subset(a, plan.placed[f][a.name]) for a in adapters if a.name in plan.placed[f]]
        injected = inject_adapters(
            model, subs, base_weights=weights, dora=dora, genai_dims=read_genai_config(folder / f)
        )
        save_model(model, new / f)
        for name, tensors in sorted(injected.tensors.items()):
            for suffix in (".onnx_adapter", ".safetensors"):
                out = new / adapter_file_name(name, f, suffix)
                write_adapter_tensors(out, tensors, model_version=injected.manifest.fingerprint)
        return injected.to_dict()

    def record(new: Path) -> None:
        write_files_manifest(new / FILES_MANIFEST, sorted(os.listdir(new)))

    return _write_folder(folder, out_dir, FolderResult(plan), rewritten, write, progress, record)

"""Export folders of several ONNX files as one model (Optimum's seq2seq layout: ``encoder_model.onnx``,
``decoder_model.onnx``, ``decoder_with_past_model.onnx`` or ``decoder_model_merged.onnx``; Whisper).

Where each target goes: a file named ``encoder*`` is tried with the targets that have no ``decoder`` path
component, a ``decoder*`` file with those that have no ``encoder`` component (an encoder exported alone
names its nodes ``/layers.0/...``, which would fit decoder targets too), other files with every target.
Then, per adapter:
- every target must be matched in at least one file (or be proven absent wherever it was tried);
- a target matched in one ``decoder*`` file must be matched (or proven absent) in every ``decoder*`` file
  it was tried in: the same weight in decoder and decoder_with_past is rewritten in both, never one;
- ambiguous or misfitting targets are refused, as for one file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lora_export.core.adapter import Adapter
from lora_export.errors import ModelError, ShapeError, TargetError

_ROLES = ("encoder", "decoder")


def model_files(folder: str | os.PathLike) -> list[str]:
    """The ONNX files at the top of ``folder``, sorted by name (refused when there are none)."""
    folder = Path(folder)
    names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".onnx") and e.is_file())
    if not names:
        raise ModelError(f"{folder} holds no .onnx file: give a model file or an export folder")
    return names


def role(file_name: str) -> str | None:
    """``encoder`` / ``decoder`` for Optimum's file names, else None."""
    low = file_name.lower()
    return next((r for r in _ROLES if low.startswith(r)), None)


def _has_component(path: str, word: str) -> bool:
    return word in path.split(".")


def role_targets(adapter: Adapter, file_role: str | None) -> set[str]:
    """The targets (and full tensors) of ``adapter`` that a file of ``file_role`` is tried with."""
    keys = [*adapter.targets, *adapter.extra]
    if file_role is None:
        return set(keys)
    other = "decoder" if file_role == "encoder" else "encoder"
    return {k for k in keys if not _has_component(k, other)}


def subset(adapter: Adapter, keys: set[str]) -> Adapter:
    """``adapter`` with only the targets and full tensors named in ``keys``."""
    targets = {k: t for k, t in adapter.targets.items() if k in keys}
    shared = {g: tuple(m for m in ms if m in targets) for g, ms in adapter.shared.items()}
    return dataclasses.replace(
        adapter,
        targets=targets,
        extra={k: v for k, v in adapter.extra.items() if k in keys},
        stored_base={k: v for k, v in adapter.stored_base.items() if k in targets},
        shared={g: ms for g, ms in shared.items() if ms},
    )


@dataclasses.dataclass
class FolderPlan:
    """Per file, per adapter: the targets and full tensors that go there (``placed``), and what was found
    where (``found[adapter][key]`` = {file: status})."""

    files: list[str]
    placed: dict[str, dict[str, set[str]]]
    found: dict[str, dict[str, dict[str, str]]]

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "placed": {f: {a: sorted(k) for a, k in sorted(per.items())} for f, per in self.placed.items()},
            "found": self.found,
        }


def plan_folder(
    folder: Path,
    adapters: Sequence[Adapter],
    *,
    base_weights: Mapping[str, np.ndarray] | None = None,
    allow_partial: bool = False,
) -> FolderPlan:
    """Resolve every adapter in every file it may belong to (see the module docstring); refuse, in one
    line, a target found nowhere, found in one decoder file and not another, ambiguous or misfitting."""
    from ..model.model_io import load_model
    from ..targets.genai_names import read_genai_config
    from ..targets.resolve import resolve_targets

    files = model_files(folder)
    placed: dict[str, dict[str, set[str]]] = {f: {} for f in files}
    found: dict[str, dict[str, dict[str, str]]] = {a.name: {} for a in adapters}
    for f in files:
        tried = {a.name: role_targets(a, role(f)) for a in adapters}
        if not any(tried.values()):
            continue
        model = load_model(folder / f)
        genai = read_genai_config(folder / f)
        for a in adapters:
            if not tried[a.name]:
                continue
            res = resolve_targets(model, subset(a, tried[a.name]), base_weights=base_weights, genai_dims=genai)
            for r in res.targets:
                if r.found_shape is not None:
                    raise ShapeError(
                        f"{f}: {r.target.name}: adapter expects a weight of shape {r.target.weight_shape}, "
                        f"the model's is {r.found_shape}"
                    )
                if r.status == "unmatched" and r.detail.startswith("ambiguous"):
                    raise TargetError(f"{f}: {r.target.name} is ambiguous: {r.detail}")
                found[a.name].setdefault(r.target.name, {})[f] = r.status
            for e in res.extras:
                if e.found_shape is not None:
                    raise ShapeError(
                        f"{f}: {e.key}: adapter tensor has shape {e.shape}, the model's is {e.found_shape}"
                    )
                found[a.name].setdefault(e.key, {})[f] = e.status
            matched = {k for k, per in found[a.name].items() if per.get(f) == "matched"}
            if matched:
                placed[f][a.name] = matched
    for a in adapters:
        for key in [*a.targets, *a.extra]:
            found[a.name].setdefault(key, {})  # tried nowhere: no file of its role (no decoder file, say)
        _check_coverage(folder, a.name, found[a.name], allow_partial)
    return FolderPlan(files, placed, found)


def _check_coverage(folder: Path, adapter: str, found: dict[str, dict[str, str]], allow_partial: bool) -> None:
    # Proven absent wherever it was tried is fine (no effect); unmatched, or tried nowhere, is not.
    nowhere = sorted(k for k, per in found.items() if "matched" not in per.values() and set(per.values()) != {"absent"})
    if nowhere and not allow_partial:
        more = f" (and {len(nowhere) - 1} more)" if len(nowhere) > 1 else ""
        raise TargetError(
            f"adapter {adapter!r}: target {nowhere[0]}{more} found in no file of {folder} "
            f"(tried: {', '.join(sorted(found[nowhere[0]])) or 'none fits it'}); use --allow-partial to apply the rest"
        )
    for key, per in sorted(found.items()):
        for group in _ROLES:
            statuses = {f: s for f, s in per.items() if role(f) == group}
            if "matched" in statuses.values() and "unmatched" in statuses.values():
                hit = next(f for f, s in statuses.items() if s == "matched")
                miss = next(f for f, s in statuses.items() if s == "unmatched")
                # Applying it to one variant of the decoder only would make the variants disagree.
                raise TargetError(
                    f"adapter {adapter!r}: target {key} is in {hit} but not found in {miss}: every variant of "
                    "a file must get the same weights (give --base-weights to prove it absent there)"
                )


def copy_entry(src: Path, dst: Path) -> None:
    """Bring a file or folder of the input folder into the output (hard links where possible)."""
    from lora_export.files.publish import link_or_copy

    if src.is_symlink() or src.is_file():
        link_or_copy(str(src), str(dst))
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)


def data_files_of(folder: Path, files: Sequence[str]) -> set[str]:
    """The external data file names the given model files of ``folder`` read."""
    from ..model.data_file import referenced_data_files

    return {d for f in files for d in referenced_data_files(folder / f)}


def check_folder_output(base: Path, out: Path) -> None:
    """Refuse an output folder that is the input folder, inside it, or holds it."""
    b, o = Path(os.path.realpath(base)), Path(os.path.realpath(out))
    if o == b or b in o.parents or o in b.parents:
        raise ModelError(f"refusing to write {out}: it is, holds or lies inside the input folder {base}")
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} exists and is not a folder: a model folder's output is a folder")


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def adapter_file_name(adapter: str, model_file: str, suffix: str = ".onnx_adapter") -> str:
    """Per-file adapter tensors: ``<adapter>.<model file stem><suffix>`` (``a1.decoder_model.onnx_adapter``)."""
    return f"{adapter}.{_SAFE.sub('_', Path(model_file).stem)}{suffix}"

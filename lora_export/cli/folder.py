"""``merge``, ``inject`` and ``inspect`` on an export folder of several ONNX files (``graph.model_folder``)."""

from __future__ import annotations

import json

import click

from ..terminal import clean, clean_lines
from ._progress import progress_bar


def _placed_lines(result_dict: dict) -> list[str]:
    lines = []
    for f, per in result_dict["placed"].items():
        for adapter, keys in per.items():
            lines.append(f"{clean(f)}: {len(keys)} target(s) of {clean(adapter)}")
    return lines


def merge_folder_command(base: str, adapter: str, output: str, as_json: bool, **options) -> None:
    """``merge FOLDER ADAPTER -o OUTDIR``."""
    from ..graph.verbs.folder_ops import merge_folder

    with progress_bar("merging", as_json) as bar:
        result = merge_folder(base, adapter, output, progress=bar, **options)
    d = result.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    lines = _placed_lines(d)
    lines += [f"copied {clean(c)}" for c in d["copied"]]
    lines.append(f"wrote {clean(output)} ({len(d['written'])} entries)")
    click.echo(clean_lines("\n".join(lines)))


def inject_folder_command(
    base: str, paths: list[str], names: list[str | None], out_dir: str, as_json: bool, **options
) -> None:
    """``inject FOLDER [NAME=]ADAPTER... -o OUTDIR``."""
    from ..graph.verbs.folder_ops import inject_folder

    with progress_bar("injecting", as_json) as bar:
        result = inject_folder(base, paths, out_dir, names=names, progress=bar, **options)
    d = result.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    lines = _placed_lines(d)
    for f, report in d["reports"].items():
        lines.append(f"{clean(f)}: {len(report['slots'])} LoRA slots")
    lines.append(f"wrote {clean(out_dir)} ({len(d['written'])} entries; serve it with LoraFolderSession)")
    click.echo(clean_lines("\n".join(lines)))


def inspect_folder_command(
    folder: str, adapter: str | None, base_weights: str | None, only_targets: str | None, as_json: bool
) -> None:
    """``inspect FOLDER [ADAPTER]``: each file's targetable weights; with ADAPTER, which file each target goes to."""
    from pathlib import Path

    from ..errors import LoraExportError
    from ..graph.verbs.inspect import inspect_model
    from ..graph.verbs.model_folder import model_files, plan_folder

    files = model_files(folder)
    report: dict = {"folder": folder, "files": {f: inspect_model(Path(folder) / f) for f in files}}
    if adapter is None and base_weights is not None:
        raise LoraExportError("--base-weights only matters with an adapter")
    if adapter is not None:
        from ..formats.peft import load_adapter
        from ..formats.safetensors import read_safetensors

        weights = read_safetensors(base_weights)[0] if base_weights is not None else None
        loaded = load_adapter(adapter).select(only_targets)
        plan = plan_folder(Path(folder), [loaded], base_weights=weights, allow_partial=True)
        report["targets"] = plan.found[loaded.name]
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    lines = []
    for f, r in report["files"].items():
        slots = f", {len(r['slots'])} LoRA slots" if r.get("slots") else ""
        lines.append(f"{clean(f)}: {len(r['targetable'])} targetable weight(s){slots}")
    for target, per in sorted(report.get("targets", {}).items()):
        where = ", ".join(f"{clean(f)} {s}" for f, s in sorted(per.items()))
        lines.append(f"  {clean(target)}: {where}")
    click.echo(clean_lines("\n".join(lines)))

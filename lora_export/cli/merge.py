"""``lora-export merge``: fold an adapter into an ONNX model's weights."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import click

from ..terminal import clean, clean_lines
from ._progress import progress_bar

if TYPE_CHECKING:
    from ..graph.verbs.merge_report import MergeReport


@click.command("merge")
@click.argument("base", type=click.Path())
@click.argument("adapter", type=click.Path())
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(), help="Merged model path (a folder for a folder BASE)."
)
@click.option(
    "--base-weights",
    type=click.Path(dir_okay=False),
    help="The base model's .safetensors, to match anonymous ONNX weights by value.",
)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply every LoRA delta by this.")
@click.option(
    "--allow-partial",
    is_flag=True,
    help="Merge what matches; skip targets not found (the result lacks their deltas, unless those are zero).",
)
@click.option("--only-targets", metavar="REGEX", help="Merge only the targets whose module path matches REGEX.")
@click.option("--force", is_flag=True, help="Merge even if the model's history records this adapter as merged.")
@click.option(
    "--requantize", is_flag=True, help="Merge into quantized weights by requantizing them (lossy; error reported)."
)
@click.option(
    "--into-float",
    is_flag=True,
    help="Merge into quantized weights by making their ops float MatMuls on the dequantized weight (exact).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def merge_command(
    base: str,
    adapter: str,
    output: str,
    base_weights: str | None,
    scale: float,
    allow_partial: bool,
    only_targets: str | None,
    force: bool,
    requantize: bool,
    into_float: bool,
    as_json: bool,
) -> None:
    """Merge ADAPTER (a PEFT adapter directory) into BASE.onnx, writing -o OUT.onnx.

    The graph is unchanged; only the adapted weights get new values. Targets are found through
    the exporter's manifest, initializer names, node names/scopes, or (with --base-weights) by value.
    The merge is recorded in OUT's metadata (lora_export.history); merging an adapter the history
    already holds is refused unless --force. BASE may be an export folder of several ONNX files (Optimum's
    encoder_model.onnx, decoder_model.onnx ...): each file gets the targets it holds, -o is a folder.
    """
    if os.path.isdir(base):
        from .folder import merge_folder_command

        merge_folder_command(base, adapter, output, as_json, base_weights=base_weights, scale=scale,
                             allow_partial=allow_partial, only_targets=only_targets, force=force,
                             requantize=requantize, into_float=into_float)  # fmt: skip
        return
    if not (requantize and into_float):  # that refusal comes first in merge_file
        refuse_early(adapter, output)
    from ..graph.verbs.merge import merge_file

    with progress_bar("merging", as_json) as bar:
        report = merge_file(
            base,
            adapter,
            output,
            base_weights=base_weights,
            scale=scale,
            allow_partial=allow_partial,
            progress=bar,
            only_targets=only_targets,
            force=force,
            requantize=requantize,
            into_float=into_float,
        )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(clean_lines(summary(report)))


def refuse_early(adapter: str, output: str) -> None:
    """The refusals ``merge_file`` makes first (a bad output path, a missing adapter), in its order and words,
    made before numpy, onnx and onnx-ir are imported: a CI typo fails in a tenth of the time."""
    from pathlib import Path

    from ..errors import AdapterError, ModelError
    from ..files.checks import check_output_file

    check_output_file(output, ModelError)
    check_output_file(f"{output}.data", ModelError)
    if not Path(adapter).exists():
        raise AdapterError(f"adapter not found: {Path(adapter)}")


def summary(report: MergeReport) -> str:
    """A concise human summary: one line per target, then counts, files and time."""
    rows = [("target", "status", "how", "initializer", "layout")]
    for r in report.resolution.targets:
        d = r.to_dict()
        rows.append(
            (d["target"], d["status"], d["strategy"] or "-", d["initializer"] or "-", d["layout"] or d["detail"])
        )
    for e in report.resolution.extras:
        d = e.to_dict()
        rows.append((d["tensor"], d["status"], "replace", d["initializer"] or "-", d["detail"]))
    # Names come from the files: escaped, so a newline or an escape sequence in one cannot break the table.
    rows = [tuple(clean(c) for c in row) for row in rows]
    widths = [min(48, max(len(str(row[i])) for row in rows)) for i in range(4)]
    lines = ["  ".join(c[:w].ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    c = report.to_dict()["counts"]
    lines.append(
        f"merged {c['merged_weights']} weight(s) from {c['targets']} target(s)"
        + (f", {c['absent']} absent" if c["absent"] else "")
        + (f", {c['unmatched']} unmatched (skipped)" if c["unmatched"] else "")
        + (f", replaced {c['replaced_tensors']} tensor(s)" if c["replaced_tensors"] else "")
        + f" in {report.timings.get('total', 0.0):.2f}s"
    )
    # What a lossy write (a requantized weight) cost, as its layout summarizes it.
    lines += [
        f"{clean(m['target'])}: {clean(m['write']['summary'])}"
        for m in report.merged
        if "summary" in m.get("write", {})
    ]
    lines += [
        f"converted {clean(c['node'])} ({clean(c['layout'])}) into float {clean(c['into'])} ({c['dtype']})"
        for c in report.converted
    ]
    if report.repeated:
        lines.append(f"note: {report.repeated}; merged anyway (--force)")
    # --allow-partial: what was left out, and why, one line each.
    lines += [f"skipped {clean(s['target'])}: {clean(s['reason'])}" for s in report.skipped()]
    lines.append("wrote " + ", ".join(clean(f) for f in report.files))
    return "\n".join(lines)

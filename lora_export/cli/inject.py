"""``lora-export inject``: add swappable LoRA slots to an ONNX model and write each adapter's tensors."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import click

from ..terminal import aligned, clean, clean_lines
from ._progress import progress_bar

if TYPE_CHECKING:
    from ..graph.verbs.inject import InjectResult


@click.command("inject")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, metavar="[NAME=]ADAPTER...")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--base-weights",
    type=click.Path(dir_okay=False),
    help="The base model's .safetensors, to match anonymous ONNX weights by value.",
)
@click.option("--only-targets", metavar="REGEX", help="Inject only the targets whose module path matches REGEX.")
@click.option("--dora", is_flag=True, help="Give every slot a DoRA scale input, so DoRA adapters converted later fit.")
@click.option(
    "--per-row",
    is_flag=True,
    help="Slots hold a pool of adapters; the int64 input lora_adapter_ids picks each batch row's (0: none).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Inject even an adapter the model's history records as merged, or one made for other base weights.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def inject_command(
    base: str,
    adapters: tuple[str, ...],
    out_dir: str,
    base_weights: str | None,
    only_targets: str | None,
    dora: bool,
    per_row: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Inject LoRA slots for ADAPTERS (PEFT adapter directories) into BASE.onnx.

    Writes OUTDIR/model.onnx, whose inputs <module>.lora_A / .lora_B (/ .dora_scale) default to the base
    model, and per adapter OUTDIR/<name>.onnx_adapter and OUTDIR/<name>.safetensors to fill them.
    <name> is the adapter folder's name, or NAME with NAME=ADAPTER. Files an earlier inject wrote into
    OUTDIR and this one does not (a dropped or renamed adapter) are removed; other files stay.
    BASE may be an export folder of several ONNX files: each file holding targets is injected under its own
    name, with <name>.<file stem>.onnx_adapter per adapter and file; the other files are copied.
    """
    from ..graph.verbs.inject import inject_files

    paths, names = zip(*(parse_named(a) for a in adapters))
    if os.path.isdir(base):
        from .folder import inject_folder_command

        inject_folder_command(base, list(paths), list(names), out_dir, as_json, base_weights=base_weights,
                              dora=dora, only_targets=only_targets)  # fmt: skip
        return
    with progress_bar("writing", as_json) as bar:
        result = inject_files(
            base,
            list(paths),
            out_dir,
            base_weights=base_weights,
            dora=dora,
            only_targets=only_targets,
            names=list(names),
            progress=bar,
            per_row=per_row,
            force=force,
        )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(clean_lines(summary(result)))


def parse_named(arg: str) -> tuple[str, str | None]:
    """``NAME=PATH`` → (PATH, NAME); a plain PATH → (PATH, None). An existing path that contains "="
    is a plain PATH."""
    name, sep, path = arg.partition("=")
    if not sep or os.path.lexists(arg):
        return arg, None
    return path, name


def summary(result: InjectResult) -> str:
    lines = [f"{len(result.manifest.slots)} LoRA slots:"]
    lines += aligned(
        [
            (module, slot.op, slot.kind, "+DoRA" if slot.dora else "")
            for module, slot in sorted(result.manifest.slots.items())
        ]
    )
    if result.manifest.absent:
        lines.append(f"absent from the graph (no effect): {', '.join(clean(m) for m in result.manifest.absent)}")
    lines += [f"wrote {clean(p)}" for p in result.files]
    return "\n".join(lines)

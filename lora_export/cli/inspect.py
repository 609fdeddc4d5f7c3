"""``lora-export inspect MODEL.onnx [ADAPTER]``: targetable weights and how an adapter resolves."""

from __future__ import annotations

import json

import click

from ..errors import VerificationError


@click.command("inspect")
@click.argument("model", type=click.Path())
@click.argument("adapter", required=False, type=click.Path())
@click.option("--base-weights", type=click.Path(dir_okay=False), help="The base's .safetensors, for fingerprinting.")
@click.option("--only-targets", metavar="REGEX", help="Resolve only the targets whose module path matches REGEX.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_command(
    model: str, adapter: str | None, base_weights: str | None, only_targets: str | None, as_json: bool
) -> None:
    """List the weights LoRA can target in MODEL; with ADAPTER, where each of its targets lands.

    MODEL may be an export folder of several ONNX files: each file is inspected, and with ADAPTER the
    report says which file each target goes to."""
    import os

    from ..graph.verbs.inspect import format_report, inspect_model
    from ..terminal import clean_lines

    if os.path.isdir(model):
        from .folder import inspect_folder_command

        inspect_folder_command(model, adapter, base_weights, only_targets, as_json)
        return
    report = inspect_model(model, adapter, base_weights=base_weights, only_targets=only_targets)
    click.echo(json.dumps(report, indent=2) if as_json else clean_lines(format_report(report)))
    nothing = nothing_matched(report)
    if nothing:
        # After the report: it shows why each target did not resolve. Exit 1 (a finding), as verify's.
        raise VerificationError(nothing)


def nothing_matched(report: dict) -> str | None:
    """With an adapter: the one line saying none of it lands on the model, or None when something does."""
    if "resolution" not in report:
        return None
    extras = report.get("extras") or []
    if report["counts"]["matched"] or any(e["status"] == "matched" for e in extras):
        return None
    n = len(report["resolution"]) + len(extras)
    return (
        f"none of the {n} target(s) of adapter {report['adapter']} matched a weight of {report['model']} "
        "(the report says why; --base-weights matches by value)"
    )

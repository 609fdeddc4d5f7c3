"""``lora-export convert-init``: a PiSSA/OLoRA/CorDA/LoRA-GA adapter as plain LoRA for the untouched base."""

from __future__ import annotations

import json

import click

from ..terminal import clean


@click.command("convert-init")
@click.argument("adapter", type=click.Path())
@click.option(
    "--initial",
    "initial",
    required=True,
    type=click.Path(),
    help="The adapter saved right after initialisation, before training (A0, B0).",
)
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Folder for the converted adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def convert_init_command(adapter: str, initial: str, output: str, as_json: bool) -> None:
    """Convert ADAPTER, trained from PEFT's PiSSA/OLoRA/CorDA/LoRA-GA init, to plain LoRA at rank 2r.

    Those inits subtract s*B0*A0 from the base weights, so the trained adapter only fits that residual
    base. With the initial adapter, dW = s*(B*A - B0*A0) = s*[B, -B0]*[A; A0] fits the untouched base
    (PEFT's path_initial_model_for_weight_conversion); OUTPUT is a PEFT adapter folder.
    """
    from ..formats.init_conversion import convert_init_adapter

    report = convert_init_adapter(adapter, initial, output)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        ranks = ", ".join(str(r) for r in report["ranks"])
        click.echo(
            f"wrote {clean(report['output'])}: {report['init']} adapter as plain LoRA, "
            f"{report['targets']} targets at rank {ranks}"
        )

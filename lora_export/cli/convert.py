"""``lora-export convert``: a later adapter for an already-injected model."""

from __future__ import annotations

import json

import click

from ..terminal import clean


@click.command("convert")
@click.argument("adapter", type=click.Path(), required=False)
@click.option("--model", "model", required=True, type=click.Path(dir_okay=False), help="The injected model.onnx.")
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="NAME.onnx_adapter or .safetensors"
)
@click.option("--only-targets", metavar="REGEX", help="Convert only the targets whose module path matches REGEX.")
@click.option(
    "--requantize",
    is_flag=True,
    help="Write int4 (quantized) LoRA inputs by quantizing A and B (lossy; error reported).",
)
@click.option(
    "--zero", is_flag=True, help="Instead of ADAPTER: a file of zeros that makes a foreign LoRA-input model the base."
)
@click.option(
    "--force",
    is_flag=True,
    help="Convert even an adapter the model's history records as merged, or one made for other base weights.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def convert_command(
    adapter: str | None,
    model: str,
    output: str,
    only_targets: str | None,
    requantize: bool,
    zero: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Convert ADAPTER (a PEFT adapter directory) into slot tensors for an injected MODEL.

    Names, layouts and dtype follow the model's LoRA inputs; targets or shapes that do not fit are
    refused. Slots the adapter does not cover keep their defaults (rank 0: no change). MODEL may also be a
    LoRA-input model made by Olive or onnxruntime-genai: names, layouts and a scale kept in its graph are
    read from the graph; int4 LoRA inputs (MatMulNBits) need --requantize.
    """
    from ..errors import ConfigError
    from ..graph.verbs.convert import convert_adapter, write_zero_adapter

    if zero == (adapter is not None):
        raise ConfigError("give either ADAPTER or --zero (a zero adapter for a model made by another tool)")
    if zero:
        if only_targets or requantize:
            raise ConfigError("--zero writes zeros for every slot: it takes neither --only-targets nor --requantize")
        report = write_zero_adapter(model, output)
    else:
        report = convert_adapter(adapter, model, output, only_targets=only_targets, requantize=requantize, force=force)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    zeroed = f", {len(report['slots_zeroed'])} zeroed" if report.get("slots_zeroed") else ""
    scales = sorted(set(report.get("graph_scales", {}).values()))
    scaled = f" (B rescaled for the graph's scale {', '.join(f'{s:g}' for s in scales)})" if scales else ""
    click.echo(
        f"wrote {clean(report['output'])}: {len(report['slots_filled'])} slots filled, "
        f"{len(report['slots_default'])} left at their defaults{zeroed}{scaled}"
    )
    errors = report.get("requantized", {})
    if errors:
        worst = max(errors, key=lambda m: errors[m]["rel_frobenius_error"])
        click.echo(
            f"requantized {len(errors)} slots ({errors[worst]['scheme']}): ΔW relative Frobenius error up to "
            f"{errors[worst]['rel_frobenius_error']:.3g} ({clean(worst)}), max abs error "
            f"{max(e['max_abs_error'] for e in errors.values()):.3g}"
        )

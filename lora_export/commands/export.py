"""``lora-export export MODULE:FUNCTION OUT.onnx``: export a torch model with the LoRA target manifest."""

from __future__ import annotations

import json

import click


@click.command("export")
@click.argument("factory", metavar="MODULE:FUNCTION")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--torchscript", is_flag=True, help="Use the TorchScript exporter instead of dynamo.")
@click.option("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's).")
@click.option("--external-data/--no-external-data", default=None, help="Force external data on or off.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def export_command(factory: str, out: str, torchscript: bool, opset: int | None, external_data, as_json: bool) -> None:
    """Export the model built by MODULE:FUNCTION to OUT.onnx.

    FUNCTION (importable from the current directory) returns (model, example_inputs) or
    (model, example_inputs, export_kwargs). LoRA wrappers are removed: the base model is exported,
    with a manifest mapping each Linear/Conv/Embedding module to its ONNX initializer.
    """
    from ..terminal import clean
    from ..torch_export import export_with_manifest, load_factory

    model, inputs, kwargs = load_factory(factory)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("path", "dynamo")}
    if opset is not None:
        kwargs["opset"] = opset
    if external_data is not None:
        kwargs["external_data"] = external_data
    try:
        result = export_with_manifest(model, inputs, out, dynamo=not torchscript, **kwargs)
    except TypeError as e:  # an unknown key in the factory's export kwargs
        from ..errors import LoraExportError

        raise LoraExportError(f"bad export arguments from {factory}: {e}") from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    mapped = len(result.manifest["modules"])
    click.echo(f"wrote {clean(result.path)} ({result.exporter} exporter): {mapped} module(s) mapped to initializers")
    if result.unmapped:
        click.echo(f"not found in the graph (folded or unused): {', '.join(clean(m) for m in result.unmapped)}")

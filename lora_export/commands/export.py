"""``lora-export export MODULE:FUNCTION OUT.onnx``: export a torch model with the LoRA target manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
    from ..onnx_model import check_outputs
    from ..terminal import clean
    from ..torch_export import export_with_manifest, load_factory

    check_outputs(out)
    model, inputs, kwargs = load_factory(factory)
    _refuse_source(factory, out)
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


def _refuse_source(factory: str, out: str) -> None:
    """Refuse an OUT (or its .data) that is the Python file the factory was imported from."""
    from ..atomic import refuse_overwrite
    from ..errors import LoraExportError

    module = sys.modules.get(factory.partition(":")[0])
    source = getattr(module, "__file__", None)
    if source:
        refuse_overwrite([Path(out), Path(f"{out}.data")], [Path(source)], LoraExportError)

"""``lora-export export FACTORY OUT.onnx``: export a torch model with the LoRA target manifest."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("export")
@click.argument("factory", metavar="FACTORY")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--torchscript", is_flag=True, help="Use the TorchScript exporter instead of dynamo.")
@click.option("--opset", type=int, default=None, help="ONNX opset version, exactly (default: the exporter's).")
@click.option("--static", is_flag=True, help="Fixed shapes: the example inputs' batch and sequence sizes.")
@click.option("--external-data/--no-external-data", default=None, help="Force external data on or off.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def export_command(
    factory: str, out: str, torchscript: bool, opset: int | None, static: bool, external_data, as_json: bool
) -> None:
    """Export the model built by FACTORY to OUT.onnx.

    FACTORY is MODULE:FUNCTION (importable from the current directory) or path/to/file.py:FUNCTION;
    FUNCTION returns (model, example_inputs) or (model, example_inputs, export_kwargs). LoRA wrappers
    are removed: the base model is exported, with a manifest mapping each Linear/Conv/Embedding module
    to its ONNX initializer. Inputs and outputs are named after the model (input_ids, logits ...);
    batch and sequence dimensions are dynamic where the model allows it, unless --static.
    """
    from ..errors import require_torch

    # torch (and onnxscript, dynamo's backend) are the [train] extra: one line when they are missing.
    require_torch("export", *(() if torchscript else ("onnxscript",)))
    from ..errors import LoraExportError
    from ..exporting.exporter import check_opset_request, export_with_manifest
    from ..exporting.factory import load_factory_module
    from ..exporting.quiet import stdout_to_stderr
    from ..graph.model.model_io import check_outputs
    from ..terminal import clean

    check_outputs(out)
    check_opset_request(opset, not torchscript)  # before the factory, which may take long
    with stdout_to_stderr():  # stdout carries our report (--json) only; what user code prints goes to stderr
        (model, inputs, kwargs), module = load_factory_module(factory)
    _refuse_source(getattr(module, "__file__", None), out)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("path", "dynamo")}
    if opset is not None:
        kwargs["opset"] = opset
    if external_data is not None:
        kwargs["external_data"] = external_data
    if static:
        kwargs["dynamic"] = False
    try:
        with stdout_to_stderr():
            result = export_with_manifest(model, inputs, out, dynamo=not torchscript, **kwargs)
    except TypeError as e:  # an unknown key in the factory's export kwargs
        raise LoraExportError(f"bad export arguments from {factory}: {e}") from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    mapped = len(result.manifest["modules"])
    click.echo(f"wrote {clean(result.path)} ({result.exporter} exporter): {mapped} module(s) mapped to initializers")
    inputs, outputs = ", ".join(map(clean, result.input_names)), ", ".join(map(clean, result.output_names))
    click.echo(f"inputs: {inputs}; outputs: {outputs}")
    dims = sorted(
        f"{clean(n)}[{axis}]={clean(dim)}" for n, axes in result.dynamic_axes.items() for axis, dim in axes.items()
    )
    click.echo(f"dynamic dimensions: {', '.join(dims)}" if dims else "fixed shapes (no dynamic dimensions)")
    if result.unmapped:
        click.echo(f"not found in the graph (folded or unused): {', '.join(clean(m) for m in result.unmapped)}")


def _refuse_source(source: str | None, out: str) -> None:
    """Refuse an OUT (or its .data) that is the Python file the factory was imported from."""
    from ..errors import LoraExportError
    from ..files.atomic import refuse_overwrite

    if source:
        refuse_overwrite([Path(out), Path(f"{out}.data")], [Path(source)], LoraExportError)

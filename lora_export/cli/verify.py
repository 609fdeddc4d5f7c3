"""``lora-export verify A.onnx [B.onnx]``: the numeric gate after a merge (exit 0 agree, 1 differ, 2 bad input)."""

from __future__ import annotations

import json

import click

from ..errors import LoraExportError, VerificationError


def _dims(values: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for item in values:
        name, sep, n = item.partition("=")
        if not sep or not name or not n.strip().isdigit():
            raise LoraExportError(f"--dim expects NAME=N, got {item!r}")
        out[name] = int(n)
    return out


@click.command("verify")
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", required=False, type=click.Path(dir_okay=False))
@click.option("--inputs", "inputs", type=click.Path(dir_okay=False), help="An .npz of inputs (default: random).")
@click.option("--reference", "references", multiple=True, type=click.Path(dir_okay=False),
              help="Reference output .npy (repeatable; matched by file name, else by order) instead of B.")  # fmt: skip
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Relative tolerance.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Absolute tolerance.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random inputs.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=N", help="Size of a symbolic dimension (repeatable).")
@click.option("--output", "output_names", multiple=True, metavar="NAME",
              help="Compare only this output (repeatable; default: every output).")  # fmt: skip
@click.option("--save-outputs", type=click.Path(file_okay=False), help="Write A's outputs and inputs here.")
@click.option("--provider", "providers", multiple=True,
              help="ONNX Runtime provider (repeatable; default CPUExecutionProvider; must be available).")  # fmt: skip
@click.option("--adapter", type=click.Path(exists=False),
              help="Run A (an injected model) with this adapter (slot file or PEFT folder).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_command(
    a, b, inputs, references, rtol, atol, seed, dims, output_names, save_outputs, providers, adapter, as_json
) -> None:
    """Run A and B (or A and --reference outputs) on the same inputs and compare every output.

    An output passes when every element satisfies |a - b| <= atol + rtol * |b| (b: B or the reference);
    outputs of different shapes fail as a shape mismatch. Exit 0: all pass; 1: one differs; 2: bad input.
    With only --save-outputs, runs A and writes reference outputs for a later verify. With --adapter, A
    (an injected model) runs with that adapter in its slots: check a served adapter against the merged
    model (B) or PyTorch's outputs (--reference). Random token ids stay within the vocabulary the model's
    embedding states.
    """
    from ..runtime.verify import run_model, save_reference, verify_models
    from ..terminal import clean

    dim_sizes = _dims(dims)
    if b is not None and references:
        raise LoraExportError("give either a second model or --reference files, not both")
    if b is None and not references:
        if save_outputs is None:
            raise LoraExportError("nothing to compare: give a second model, --reference files or --save-outputs")
        feeds, outs = run_model(
            a,
            inputs=inputs,
            seed=seed,
            providers=providers or None,
            dims=dim_sizes,
            outputs=output_names or None,
            adapter=adapter,
        )
        written = save_reference(save_outputs, list(outs), list(outs.values()), feeds)
        if as_json:
            click.echo(json.dumps({"model": a, "written": [str(p) for p in written]}, indent=2))
        else:
            click.echo(f"wrote {len(outs)} reference output(s) and inputs.npz to {clean(save_outputs)}")
        return
    report = verify_models(
        a,
        b if b is not None else list(references),
        inputs=inputs,
        seed=seed,
        rtol=rtol,
        atol=atol,
        providers=providers or None,
        dims=dim_sizes,
        save_outputs=save_outputs,
        outputs=output_names or None,
        adapter=adapter,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"pass if {report.criterion()}")
        for o in report.outputs:
            mark = "ok  " if o.allclose else "FAIL"
            extra = f"  {clean(o.detail)}" if o.detail else ""
            if o.shape_mismatch:
                click.echo(f"{mark} {clean(o.name)} shape mismatch: {o.shape} vs reference {o.reference_shape}")
                continue
            click.echo(
                f"{mark} {clean(o.name)} {o.shape} max_abs={o.max_abs:.3g} max_rel={o.max_rel:.3g} "
                f"mismatched={o.mismatched}{extra}"
            )
        if report.passed:
            click.echo(clean(report.summary()))
    if not report.passed:
        raise VerificationError(report.summary())

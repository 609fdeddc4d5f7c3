"""``lora-export combine``: one adapter computing a weighted sum of adapters' ΔW (exact, or SVD-truncated)."""

from __future__ import annotations

import json

import click

from ..errors import ConfigError
from ..terminal import clean


def _weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights must be {n} comma-separated numbers, got {text!r}") from None


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--weights", metavar="W1,W2,...", help="One weight per adapter (default 1 each); negatives subtract.")
@click.option("--method", type=click.Choice(["cat", "svd"]), default="cat", show_default=True)
@click.option("--rank", type=click.IntRange(min=1), help="svd: the rank K each target is truncated to.")
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Folder for the combined adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def combine_command(
    adapters: tuple[str, ...], weights: str | None, method: str, rank: int | None, output: str, as_json: bool
) -> None:
    """Write one PEFT adapter whose delta is W1*dW(A1) + W2*dW(A2) + ... (ADAPTERS: PEFT adapter folders).

    cat (default) is exact: the LoRA factors side by side, rank = the sum of ranks, any weights (negative
    too), rsLoRA and rank/alpha patterns, different target sets. svd truncates each target's sum to rank K and
    reports its spectral error (sigma_K+1) and relative Frobenius error. DoRA adapters are refused.
    """
    from ..formats.combined_folder import combine_files  # numpy and safetensors: only when it runs

    result = combine_files(adapters, output, _weights(weights, len(adapters)), method=method, rank=rank)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    ranks = ", ".join(str(r) for r in result.to_dict()["ranks"])
    click.echo(
        f"wrote {clean(output)}: {len(adapters)} adapter(s) combined by {method}, "
        f"{len(result.adapter.targets)} targets at rank {ranks}"
    )
    if result.targets:
        worst = max(result.targets.items(), key=lambda kv: kv[1]["relative_error"])
        click.echo(
            f"largest truncation error: {clean(worst[0])}: spectral {worst[1]['spectral_error']:.3g}, "
            f"relative Frobenius {worst[1]['relative_error']:.3g}"
        )

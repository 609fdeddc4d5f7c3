"""``lora-export build RECIPE.toml -o DIST``: build, verify and publish every artifact a recipe names."""

from __future__ import annotations

import json

import click

from ..terminal import clean
from ._progress import phase


@click.command("build")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "dist", required=True, type=click.Path(), help="The DIST folder to publish.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Content-hash cache folder (default: .lora-export-cache beside DIST).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def build_command(recipe: str, dist: str, cache_dir: str | None, as_json: bool) -> None:
    """Build the artifacts of RECIPE.toml (merged models, an injected model with adapter files) into DIST.

    Each artifact is verified against reference outputs before DIST is replaced, in one step, by the new
    build with DIST/manifest.json (every file's sha256 and size, provenance, verification figures, versions).
    Artifacts whose inputs did not change come from the cache. Exit 0: built and verified; 1: a
    verification failed (DIST untouched); 2: bad recipe or input.
    """
    from ..build.runner import MANIFEST, build

    result = build(recipe, dist, cache_dir=cache_dir, phase=lambda label: phase(label, as_json))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    if result.up_to_date:
        click.echo(f"{clean(dist)} is up to date ({len(result.cached)} artifact(s))")
        return
    for art in result.manifest["artifacts"]:
        how = "built" if art["path"] in result.built else "cached"
        figs = [f for figs in art["verification"]["adapters"].values() for f in figs]
        worst = max((f["max_abs"] or 0.0 for f in figs), default=0.0)
        click.echo(f"{how:6}  {clean(art['path'])}  verified ({len(figs)} output(s), max abs error {worst:.3g})")
    click.echo(f"wrote {clean(dist)}/{MANIFEST}")

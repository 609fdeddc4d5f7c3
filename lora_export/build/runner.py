"""Running a recipe: plan the artifacts (each with its content-hash cache key), build and verify those not
in the cache, then publish DIST (artifacts + ``manifest.json``) in one swap. A failed verification
raises ``VerificationError`` (exit 1) before anything is published: a previous DIST stays as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path

from .._version import __version__
from ..errors import LoraExportError, VerificationError
from . import cache as cachelib
from .recipe import Recipe, RecipeError, load_recipe
from .steps import Step, build_step, load_npz, per_row_available, verify_step

MANIFEST = "manifest.json"
FORMAT = "lora-export-build/1"
_VERSIONED = ("onnx", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "numpy", "torch", "peft", "transformers")

Phase = Callable[[str], contextlib.AbstractContextManager]


@dataclasses.dataclass
class BuildResult:
    """What a build did: the manifest, which artifacts were rebuilt, and whether DIST was already current."""

    dist: Path
    manifest: dict
    built: list[str]
    cached: list[str]
    up_to_date: bool

    def to_dict(self) -> dict:
        return {
            "dist": str(self.dist),
            "manifest": str(self.dist / MANIFEST),
            "up_to_date": self.up_to_date,
            "built": self.built,
            "cached": self.cached,
            "artifacts": self.manifest["artifacts"],
        }


@contextlib.contextmanager
def _no_phase(label: str) -> Iterator[None]:
    yield


def versions() -> dict[str, str]:
    """The tool's version and its dependencies' installed versions (metadata only: nothing imported)."""
    from importlib import metadata

    out = {"lora-export": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _rel(recipe: Recipe, p: Path) -> str:
    # Paths relative to the recipe: the manifest holds no absolute (machine-specific) path.
    return Path(os.path.relpath(p, recipe.path.parent)).as_posix()


def _model_files(model: Path) -> list[tuple[str, Path]]:
    """The files a base model is read from: the model and the external data it names."""
    from ..graph.model.data_file import referenced_data_files

    if model.is_dir():
        # An export folder: every file in it (the models, their data, configs) is part of the base.
        files = sorted(p for p in model.rglob("*") if p.is_file() and not p.is_symlink())
        return [(p.relative_to(model).as_posix(), p) for p in files]
    if not model.is_file():
        raise LoraExportError(f"no base model at {model}")
    data = sorted(referenced_data_files(model))
    return [(model.name, model), *((d, model.parent / d) for d in data if (model.parent / d).is_file())]


def _adapter_digest(path: Path) -> str:
    from ..formats.peft import adapter_files

    if not path.exists():
        raise LoraExportError(f"no adapter at {path}")
    files = adapter_files(path)
    if not files:
        raise LoraExportError(f"{path}: no adapter files (adapter_config.json and weights) there")
    return cachelib.files_digest((f.name, f) for f in files)


def plan(recipe: Recipe, base: Path) -> list[Step]:
    """The steps of ``recipe`` with their cache keys and provenance (hashes every input file)."""
    base_digest = cachelib.files_digest(_model_files(base))
    weights = recipe.base_weights
    weights_digest = cachelib.files_digest([("w", weights)]) if weights is not None else None
    used = sorted({a for art in recipe.artifacts for a in art.adapters})
    digests = {a: _adapter_digest(recipe.adapters[a]) for a in used}
    v = recipe.verify
    inputs_digest = cachelib.files_digest([("inputs", v.inputs)]) if v.inputs is not None else None
    ref_digests = {a: cachelib.files_digest([(a, p)]) for a, p in v.references.items() if a in digests}
    steps = []
    for art in recipe.artifacts:
        if art.kind == "per-row" and base.is_dir():
            raise RecipeError("artifact kind 'per-row' is not available for a model folder in this version")
        if art.kind == "per-row" and not per_row_available():
            raise RecipeError("artifact kind 'per-row' is not available in this version (inject --per-row)")
        groups = [(f"merged/{a}", (a,)) for a in art.adapters] if art.kind == "merged" else [(art.kind, art.adapters)]
        for where, names in groups:
            provenance = {
                "base": {"path": _rel(recipe, base), "sha256": base_digest},
                "adapters": {a: {"path": _rel(recipe, recipe.adapters[a]), "sha256": digests[a]} for a in names},
                "options": dict(sorted(art.options.items())),
            }
            if weights is not None:
                provenance["base_weights"] = {"path": _rel(recipe, weights), "sha256": weights_digest}
            key = cachelib.key_of(
                {
                    "tool": __version__,
                    "kind": art.kind,
                    "where": where,
                    "folder": base.is_dir(),
                    "provenance": provenance,
                    "verify": {
                        "inputs": inputs_digest,
                        "references": {a: ref_digests.get(a) for a in names},
                        "atol": v.atol,
                        "rtol": v.rtol,
                    },
                }
            )
            steps.append(Step(where, art.kind, names, dict(art.options), key, provenance, base.is_dir()))
    return steps


def _check_dist(dist: Path) -> None:
    if dist.exists() and not dist.is_dir():
        raise LoraExportError(f"{dist} exists and is not a folder")
    if dist.is_dir() and any(dist.iterdir()) and not (dist / MANIFEST).is_file():
        raise LoraExportError(f"{dist} is a folder with files and no {MANIFEST}: not a build output; give another -o")


def _manifest_bytes(recipe: Recipe, entries: list[tuple[Step, dict]]) -> tuple[dict, bytes]:
    files, artifacts = {}, []
    for step, entry in entries:
        names = []
        for rel, info in entry["files"].items():
            files[f"{step.where}/{rel}"] = info
            names.append(f"{step.where}/{rel}")
        artifacts.append(
            {
                "path": step.where,
                "kind": step.kind,
                "adapters": list(step.adapters),
                "provenance": step.provenance,
                "verification": entry["verification"],
                "files": names,
                "cache_key": step.key,
            }
        )
    manifest = {
        "format": FORMAT,
        "recipe": {"name": recipe.path.name, "sha256": cachelib.file_sha256(recipe.path)},
        "versions": versions(),
        "artifacts": artifacts,
        "files": dict(sorted(files.items())),
    }
    return manifest, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _is_current(dist: Path, manifest: dict, data: bytes) -> bool:
    """Whether DIST already holds exactly this build: same manifest bytes, same files, nothing else."""
    try:
        if (dist / MANIFEST).read_bytes() != data:
            return False
        found = cachelib.folder_files(dist)
    except OSError:
        return False
    found.pop(MANIFEST, None)
    return found == manifest["files"]


def _current_manifest(recipe: Recipe, steps: list[Step], dist: Path) -> dict | None:
    """DIST's manifest when DIST already holds this build: every step's cache key recorded there, the
    manifest it would get byte-identical, and every file's sha256 as recorded (the cache is not read)."""
    try:
        data = (dist / MANIFEST).read_bytes()
        old = json.loads(data)
        arts = {a["path"]: a for a in old["artifacts"]}
        entries = []
        for step in steps:
            art = arts.get(step.where)
            if art is None or art.get("cache_key") != step.key:
                return None
            files = {name[len(step.where) + 1 :]: old["files"][name] for name in art["files"]}
            entries.append((step, {"files": files, "verification": art["verification"]}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    manifest, new = _manifest_bytes(recipe, entries)
    return manifest if new == data and _is_current(dist, manifest, new) else None


def _failure(failed: list[tuple[Step, dict]]) -> str:
    step, ver = failed[0]
    for adapter, figs in ver["adapters"].items():
        for f in figs:
            if not f["passed"]:
                err = f"max abs error {f['max_abs']:.3g}" if f["max_abs"] is not None else f.get("detail", "")
                more = f" (and {len(failed) - 1} more artifact(s))" if len(failed) > 1 else ""
                return (
                    f"verification failed: {step.where} with {adapter!r}, output {f['output']!r}: {err} beyond "
                    f"atol {ver['atol']:g}, rtol {ver['rtol']:g}{more}; DIST left unchanged"
                )
    return f"verification failed: {step.where}; DIST left unchanged"


def build(
    recipe_path: str | os.PathLike,
    dist: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    phase: Phase = _no_phase,
) -> BuildResult:
    """Build the recipe at ``recipe_path`` into the folder ``dist`` (see the module docstring).

    ``cache_dir`` defaults to ``<dist's folder>/.lora-export-cache``. ``phase(label)`` is entered around
    each long step (progress on a terminal)."""
    recipe = load_recipe(recipe_path)
    dist = Path(dist)
    _check_dist(dist)
    cache = Path(cache_dir) if cache_dir is not None else dist.absolute().parent / ".lora-export-cache"
    with phase("hashing inputs"):
        base = _base_model(recipe, cache, phase)
        steps = plan(recipe, base)
    current = _current_manifest(recipe, steps, dist)
    if current is not None:
        return BuildResult(dist, current, [], [s.where for s in steps], True)
    entries: list[tuple[Step, dict]] = []
    built, cached, failed = [], [], []
    loaded: dict = {}
    for step in steps:
        entry = cachelib.lookup(cache, step.key)
        if entry is not None:
            cached.append(step.where)
            entries.append((step, entry))
            continue
        inputs, references = _verify_data(recipe, base, loaded)
        with cachelib.new_entry(cache, step.key) as tmp:
            with phase(f"building {step.where}"):
                summary = build_step(step, base, recipe.adapters, recipe.base_weights, tmp / "files")
            with phase(f"verifying {step.where}"):
                ver = verify_step(step, tmp / "files", inputs, references, recipe.verify.atol, recipe.verify.rtol)
            if ver["passed"]:
                cachelib.write_entry(tmp, {"key": step.key, "summary": summary, "verification": ver})
        if not ver["passed"]:
            failed.append((step, ver))
            continue
        built.append(step.where)
        entry = cachelib.lookup(cache, step.key)
        if entry is None:
            raise LoraExportError(f"the cache entry of {step.where} in {cache} vanished while building")
        entries.append((step, entry))
    if failed:
        raise VerificationError(_failure(failed))
    manifest, data = _manifest_bytes(recipe, entries)
    if not built and _is_current(dist, manifest, data):
        return BuildResult(dist, manifest, built, cached, True)
    with phase("publishing"):
        _publish(dist, cache, entries, data)
    return BuildResult(dist, manifest, built, cached, False)


def _base_model(recipe: Recipe, cache: Path, phase: Phase) -> Path:
    """The base ONNX model: the recipe's file, or the export factory's model exported into the cache."""
    if recipe.model is not None:
        return recipe.model
    from .factory import exported_base

    return exported_base(recipe.export, recipe.path.parent, cache, phase)


def _verify_data(recipe: Recipe, base: Path, loaded: dict) -> tuple[dict, dict]:
    """The verification inputs and reference outputs per adapter, read (or computed) once per build."""
    if not loaded:
        v = recipe.verify
        if v.inputs is not None:
            inputs = load_npz(v.inputs, "verification inputs")
        else:
            from .factory import example_inputs

            inputs = example_inputs(recipe.export, recipe.path.parent)
        refs = {a: load_npz(p, f"reference outputs for {a!r}") for a, p in v.references.items()}
        missing = sorted(set(recipe.adapters) - set(refs))
        if missing:
            from .factory import computed_references

            refs.update(
                computed_references(
                    recipe.export, recipe.path.parent, base, inputs, {a: recipe.adapters[a] for a in missing}
                )
            )
        loaded.update(inputs=inputs, references=refs)
    return loaded["inputs"], loaded["references"]


def _publish(dist: Path, cache: Path, entries: list[tuple[Step, dict]], manifest: bytes) -> None:
    """Assemble DIST from the cache entries (hard links where possible) and swap it in whole."""
    from ..files.publish import link_or_copy, publish_folder
    from ..files.staging import staging_dir

    target = Path(os.path.realpath(dist)) if dist.is_symlink() else dist
    with staging_dir(target.absolute().parent) as stage:
        new = stage / "dist"
        new.mkdir()
        for step, entry in entries:
            for rel in entry["files"]:
                out = new / step.where / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(str(cache / step.key / "files" / rel), str(out))
        (new / MANIFEST).write_bytes(manifest)
        old = {p.name for p in target.iterdir()} if target.is_dir() else set()
        # Nothing of an old DIST is carried over: DIST is exactly this build.
        publish_folder(new, target, stage, replaced={p.name for p in new.iterdir()} | old)

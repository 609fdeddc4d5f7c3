"""Parsing and validating a build recipe (TOML). Every problem is one ``RecipeError`` line (exit 2);
unknown tables and keys are refused, never ignored, so a typo cannot silently change a build.

Relative paths are relative to the recipe's folder. See ``docs``: the README's recipe reference.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LoraExportError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

KINDS = ("merged", "injected", "per-row")
# Options each artifact kind accepts besides ``kind`` and ``adapters``, with their types.
OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "merged": {
        "scale": (int, float),
        "requantize": bool,
        "into_float": bool,
        "allow_partial": bool,
        "only_targets": str,
    },
    "injected": {"dora": bool, "only_targets": str},
    "per-row": {"dora": bool, "only_targets": str},
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RecipeError(LoraExportError):
    """A recipe that cannot be built as written (exit 2)."""


@dataclass(frozen=True)
class Artifact:
    """One ``[[artifact]]``: what to build (``kind``) from which adapters, with which options."""

    kind: str
    adapters: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verify:
    """``[verify]``: inputs (.npz, or the factory's example inputs), reference outputs per adapter (.npz of
    output name → array; missing ones computed from the export factory's PyTorch model), tolerances."""

    inputs: Path | None
    references: dict[str, Path]
    atol: float
    rtol: float


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; paths are absolute (resolved against the recipe's folder)."""

    path: Path
    model: Path | None
    export: str | None
    base_weights: Path | None
    adapters: dict[str, Path]
    artifacts: tuple[Artifact, ...]
    verify: Verify


def _fail(path: Path, message: str) -> RecipeError:
    return RecipeError(f"{path.name}: {message}")


def _keys(path: Path, where: str, table: Any, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(table, dict):
        raise _fail(path, f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r} in {where} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(table))
    if missing:
        raise _fail(path, f"{where} needs {missing[0]!r}")
    return table


def _str(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"{where} must be a non-empty string")
    if "\x00" in value:
        raise _fail(path, f"{where} contains a NUL byte")
    return value


def _path(path: Path, where: str, value: Any) -> Path:
    return (path.parent / _str(path, where, value)).absolute()


def _tolerance(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _fail(path, f"{where} must be a finite number >= 0")
    return float(value)


def load_recipe(recipe_path: str | Path) -> Recipe:
    """Read and validate ``recipe_path``; raises ``RecipeError`` with one line on any problem."""
    path = Path(recipe_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"no recipe at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read the recipe {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise _fail(path, f"not valid TOML: {e}") from None
    return parse_recipe(data, path)


def parse_recipe(data: dict, path: Path) -> Recipe:
    """Validate a parsed recipe (``path``: where it came from, for relative paths and messages)."""
    _keys(path, "the recipe", data, {"base", "adapters", "artifact", "verify"}, {"base", "adapters", "artifact"})
    base = _keys(path, "[base]", data["base"], {"model", "export", "base_weights"})
    if ("model" in base) == ("export" in base):
        raise _fail(path, "[base] needs exactly one of 'model' (an ONNX file or export folder) or 'export'")
    model = _path(path, "[base] model", base["model"]) if "model" in base else None
    export = _str(path, "[base] export", base["export"]) if "export" in base else None
    base_weights = _path(path, "[base] base_weights", base["base_weights"]) if "base_weights" in base else None

    adapters_table = data["adapters"]
    if not isinstance(adapters_table, dict) or not adapters_table:
        raise _fail(path, '[adapters] must be a table of name = "path" with at least one adapter')
    adapters = {}
    for name, value in adapters_table.items():
        if not _NAME.match(name):
            raise _fail(path, f"adapter name {name!r} must be letters, digits, '_', '.', '-' (a file name)")
        adapters[name] = _path(path, f"[adapters] {name}", value)

    artifacts = _artifacts(path, data["artifact"], adapters)
    if "verify" not in data:
        raise _fail(path, "no [verify] table: every artifact is verified (give inputs and references)")
    verify = _verify(path, data["verify"], adapters, export)
    return Recipe(path.absolute(), model, export, base_weights, adapters, artifacts, verify)


def _artifacts(path: Path, items: Any, adapters: dict[str, Path]) -> tuple[Artifact, ...]:
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise _fail(path, "[[artifact]] must be an array of tables with at least one artifact")
    out, merged_seen, kinds_seen = [], set(), set()
    for n, item in enumerate(items, 1):
        where = f"[[artifact]] #{n}"
        kind = item.get("kind")
        if kind not in KINDS:
            raise _fail(path, f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        _keys(path, where, item, {"kind", "adapters", *OPTIONS[kind]}, {"adapters"})
        names = item["adapters"]
        if not isinstance(names, list) or not names or not all(isinstance(a, str) for a in names):
            raise _fail(path, f"{where}: adapters must be a non-empty list of adapter names")
        for a in names:
            if a not in adapters:
                raise _fail(path, f"{where}: adapter {a!r} is not in [adapters]")
        if len(set(names)) != len(names):
            raise _fail(path, f"{where}: an adapter is listed twice")
        options = {}
        for key, typ in OPTIONS[kind].items():
            if key in item:
                value = item[key]
                if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
                    raise _fail(path, f"{where}: {key} has the wrong type")
                options[key] = float(value) if key == "scale" else value
        if kind == "merged":
            again = sorted(merged_seen & set(names))
            if again:
                raise _fail(path, f"{where}: adapter {again[0]!r} is merged by two artifacts (one merged/{again[0]})")
            merged_seen |= set(names)
            if options.get("requantize") and options.get("into_float"):
                raise _fail(path, f"{where}: requantize and into_float exclude each other")
        elif kind in kinds_seen:
            raise _fail(path, f"{where}: only one {kind!r} artifact per recipe (it is the folder {kind}/)")
        kinds_seen.add(kind)
        out.append(Artifact(kind, tuple(names), options))
    return tuple(out)


def _verify(path: Path, table: Any, adapters: dict[str, Path], export: str | None) -> Verify:
    _keys(path, "[verify]", table, {"inputs", "references", "tolerance", "rtol"})
    inputs = _path(path, "[verify] inputs", table["inputs"]) if "inputs" in table else None
    if inputs is None and export is None:
        raise _fail(path, "[verify] needs inputs (an .npz) when the base is a model file")
    refs_table = table.get("references", {})
    if not isinstance(refs_table, dict):
        raise _fail(path, '[verify] references must be a table of adapter = "outputs.npz"')
    references = {}
    for name, value in refs_table.items():
        if name not in adapters:
            raise _fail(path, f"[verify] references: {name!r} is not in [adapters]")
        references[name] = _path(path, f"[verify] references.{name}", value)
    if export is None:
        missing = sorted(set(adapters) - set(references))
        if missing:
            raise _fail(
                path,
                f"[verify] references has no outputs for {missing[0]!r} "
                "(give an .npz, or build from an export factory)",
            )
    atol = _tolerance(path, "[verify] tolerance", table.get("tolerance", 1e-5))
    rtol = _tolerance(path, "[verify] rtol", table.get("rtol", 0.0))
    return Verify(inputs, references, atol, rtol)

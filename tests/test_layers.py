"""The package's layers: imports point only down, and no module imports another in a cycle.

Every import statement counts, at module level or inside a function. Imports under ``if TYPE_CHECKING:``
count for the direction (a type from a higher layer is still a dependency on it) but not for cycles, since
they never run. Imports by ``importlib`` (the lazy torch API, PEFT variant loaders) are not seen here.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"lora_export": REPO / "lora_export", "lora_export_plugins": REPO / "plugins" / "lora_export_plugins"}

# Layers from the bottom up. A module imports modules of its own layer and of lower ones only; layers of
# equal rank (core and files; graph and training; runtime and exporting; cli and the API) never import
# each other.
RANK = {
    "base": 0,  # errors, JSON and terminal text helpers that every layer uses
    "core": 1,  # the canonical adapter: types, configs, target patterns, ΔW/DoRA math (torch-free)
    "files": 1,  # atomic outputs, path checks
    "formats": 2,  # adapter files in and out
    "graph": 3,  # ONNX graph stages (sub-layers below)
    "training": 3,  # torch modules, attach/merge/save
    "runtime": 4,  # LoraSession, verify
    "exporting": 4,  # torch → ONNX
    "build": 5,  # recipes: export, merge/inject, verify, publish
    "cli": 6,
    "api": 6,  # lora_export/__init__.py
    "main": 7,  # python -m lora_export
    "plugins": 7,  # op layouts found through entry points
}
# graph/'s sub-packages from the bottom up, ordered the same way inside the graph layer.
GRAPH_RANK = {
    "model": 0,  # model I/O, validation, the metadata we store in models
    "match": 1,  # module paths in ONNX names, base weights by value
    "ops": 2,  # op layouts, side branches, packed projections, float conversion
    "targets": 3,  # target resolution
    "slots": 3,  # adapter mode: slot tensors, VeRA and foreign slots
    "verbs": 4,  # merge, inject, convert, inspect
}
# Each module's layer: the longest dotted prefix listed here that names it.
LAYER = {
    "lora_export": "api",
    "lora_export.__main__": "main",
    "lora_export.errors": "base",
    "lora_export.safejson": "base",
    "lora_export._version": "base",
    "lora_export.terminal": "base",
    "lora_export.core": "core",
    "lora_export.files": "files",
    "lora_export.formats": "formats",
    "lora_export.graph": "graph",
    **{f"lora_export.graph.{sub}": f"graph.{sub}" for sub in GRAPH_RANK},
    "lora_export.training": "training",
    "lora_export.runtime": "runtime",
    "lora_export.exporting": "exporting",
    "lora_export.build": "build",
    "lora_export.cli": "cli",
    "lora_export_plugins": "plugins",
}
TORCH_FREE = {"base", "core", "files", "formats", "graph", "runtime", "cli", "api", "plugins"}
HEAVY = ("torch", "transformers", "peft", "onnxscript")


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package's __init__)."""
    out = {}
    for pkg, root in PACKAGES.items():
        for p in root.rglob("*.py"):
            parts = (pkg, *p.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _function_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def imports(name: str, is_pkg: bool, source: str, known: set[str]) -> list[tuple[str, bool, bool]]:
    """Every import of one module: (imported name, under TYPE_CHECKING, inside a function).

    Relative imports are resolved; ``from package import module`` names the module. Names outside ``known``
    are kept as written (third-party, or an internal module that does not exist).
    """
    tree = ast.parse(source)
    typing_only, in_function = _type_checking_nodes(tree), _function_nodes(tree)
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        flags = (id(node) in typing_only, id(node) in in_function)
        if isinstance(node, ast.Import):
            out += [(a.name, *flags) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known else base, *flags))
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        layer = LAYER.get(".".join(parts[:n]))
        if layer:
            return layer
    return None


def allowed(src: str, dst: str) -> bool:
    """Whether a module of layer ``src`` may import one of layer ``dst``."""
    if src == dst:
        return True
    (s_top, _, s_sub), (d_top, _, d_sub) = src.partition("."), dst.partition(".")
    if s_top == d_top == "graph":
        return bool(s_sub and d_sub) and GRAPH_RANK[d_sub] < GRAPH_RANK[s_sub]
    return RANK[d_top] < RANK[s_top]


@functools.cache
def internal_imports() -> dict[str, list[tuple[str, bool, bool]]]:
    mods = modules()
    known = set(mods)
    out = {}
    for name, (path, is_pkg) in mods.items():
        found = imports(name, is_pkg, path.read_text(encoding="utf-8"), known)
        out[name] = [(m, t, f) for m, t, f in found if m.split(".")[0] in PACKAGES and m != name]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for layer in LAYER.values():
        top, _, sub = layer.partition(".")
        assert top in RANK and (not sub or (top == "graph" and sub in GRAPH_RANK)), layer
    assert [m for m in modules() if layer_of(m) is None] == []
    # graph/ keeps no module beside its sub-packages: each sits in the sub-package of its job.
    loose = [m for m in modules() if layer_of(m) == "graph" and m != "lora_export.graph"]
    assert loose == [], "place each in a graph sub-package (and in LAYER): " + ", ".join(loose)


def test_every_internal_import_names_a_module():
    known = set(modules())
    broken = sorted({(src, m) for src, found in internal_imports().items() for m, _, _ in found if m not in known})
    assert broken == []


def test_imports_point_down():
    known = set(modules())
    upward = sorted(
        f"{src} ({layer_of(src)}) imports {dst} ({layer_of(dst)})"
        for src, found in internal_imports().items()
        for dst, _, _ in found
        if dst in known and not allowed(layer_of(src), layer_of(dst))
    )
    assert upward == []


def test_no_import_cycles_function_level_imports_included():
    graph = {
        src: {dst for dst, typing_only, _ in found if not typing_only} for src, found in internal_imports().items()
    }
    assert cycles(graph) == []


def test_torch_free_layers_import_torch_only_inside_functions():
    eager = sorted(
        f"{name} imports {dst}"
        for name, (path, is_pkg) in modules().items()
        if layer_of(name).partition(".")[0] in TORCH_FREE
        for dst, typing_only, in_function in imports(name, is_pkg, path.read_text(encoding="utf-8"), set())
        if not typing_only and not in_function and dst.split(".")[0] in HEAVY
    )
    assert eager == []


def test_layer_rules_refuse_what_they_should():
    assert allowed("graph.verbs", "graph.model") and allowed("graph.ops", "core") and allowed("cli", "graph.verbs")
    assert not allowed("formats", "training")  # formats/peft.py once took LoraConfig from training/
    assert not allowed("graph.model", "graph.slots")  # model_check once read the slot manifest from slots
    assert not allowed("graph.targets", "graph.slots") and not allowed("graph.slots", "graph.targets")
    assert not allowed("graph.ops", "cli") and not allowed("core", "files") and not allowed("graph.ops", "graph")


def test_detector_sees_function_level_and_typing_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .b import x\n"
        "if TYPE_CHECKING:\n    from ..c import y\n"
        "def f():\n    from . import d\n    import torch\n"
    )
    found = imports("p.q.a", False, source, {"p.q.d"})
    assert ("p.q.b", False, False) in found
    assert ("p.c", True, False) in found
    assert ("p.q.d", False, True) in found
    assert ("torch", False, True) in found
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]

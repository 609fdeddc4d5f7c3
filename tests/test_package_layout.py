"""The package's shape: no import cycles between its modules (type-only imports aside), and no module
far beyond ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lora_export"
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (at top level or inside functions)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_export"):
                deps.add(node.module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


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
        for w in sorted(graph[v]):
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


def test_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_modules_stay_small():
    big = {
        str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big


def test_readme_module_map_matches_the_tree():
    """Every module in the README's layout table exists, and every module of the package is in it."""
    import re

    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout") :]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    named = {m for row in rows for m in re.findall(r"`([\w/*]+)`", row)}
    modules = {str(p.relative_to(ROOT).with_suffix("")) for p in ROOT.rglob("*.py") if p.name != "__init__.py"}
    modules.discard("__main__")
    listed = set()
    for name in named:
        if name.endswith("/*"):
            listed |= {m for m in modules if m.startswith(name[:-1])}
        else:
            assert name in modules, f"README names {name}, which is not a module"
            listed.add(name)
    assert modules - listed == set()


def test_no_merge_conflict_markers():
    """A half-resolved merge leaves markers that neither Python nor Markdown reject."""
    import re

    repo = ROOT.parent
    files = [
        repo / "README.md",
        repo / "pyproject.toml",
        *repo.glob("lora_export/**/*.py"),
        *repo.glob("plugins/**/*.py"),
    ]
    files += [*repo.glob("tests/*.py"), *repo.glob("samples/*.py"), *repo.glob("benchmarks/*.py")]
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)
    assert [str(f.relative_to(repo)) for f in files if marker.search(f.read_text(encoding="utf-8"))] == []

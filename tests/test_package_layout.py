"""The package's shape: no module far beyond ~400 lines, and the README's module map follows the tree.
(Layers and import cycles: ``test_layers``.)"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lora_export"
MAX_LINES = 420


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

"""The README's 5-minute tour runs as written: its Python blocks are the files they name (``# train.py``),
its bash blocks run line by line in an empty folder with this environment's ``lora-export`` on PATH."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def tour_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block between the tour's heading and the next section."""
    start = text.index("## A 5-minute tour")
    end = text.index("\n## ", start + 1)
    return _BLOCK.findall(text[start:end])


def test_tour_blocks_are_files_or_commands():
    blocks = tour_blocks(README.read_text(encoding="utf-8"))
    assert sum(lang == "bash" for lang, _ in blocks) >= 3
    for lang, code in blocks:
        if lang == "python":
            assert re.match(r"# [\w]+\.py\n", code), f"a Python block must name its file: {code[:40]!r}"


def test_readme_tour_runs(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # The package under test (not whatever an editable install points at), and the tour's own files.
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(README.parent)])
    blocks = tour_blocks(README.read_text(encoding="utf-8"))
    # The files first (the text may run a script before showing it), then the commands in order.
    for code in (code for lang, code in blocks if lang == "python"):
        (tmp_path / code.splitlines()[0][2:].strip()).write_text(code, encoding="utf-8")
    for code in (code for lang, code in blocks if lang == "bash"):
        res = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, f"{code}\n--- stdout\n{res.stdout[-2000:]}\n--- stderr\n{res.stderr[-2000:]}"
    assert (tmp_path / "served" / "support.onnx_adapter").is_file()

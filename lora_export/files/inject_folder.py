"""What an inject output folder holds besides the model: safe adapter file names, and the record of the
files an inject wrote (``.lora-export.json``), so a later inject removes only its own stale files."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .. import safejson
from ..errors import AdapterError
from .checks import check_output_file
from .staging import STAGE_PREFIX

FILES_MANIFEST = ".lora-export.json"
# Control characters (C0, DEL, C1) and the Unicode line separators: never in a file name we write.
_BAD_NAME_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def check_adapter_name(name: str, hint: str = "") -> str:
    """Refuse a name that cannot be a plain file name in OUTDIR (``<name>.onnx_adapter``)."""
    problem = None
    if not name:
        problem = "is empty"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        problem = "contains a path separator"
    elif name.startswith("."):
        problem = "starts with a dot"
    elif _BAD_NAME_CHARS.search(name):
        problem = "contains control characters"
    elif name != name.strip():
        problem = "starts or ends with white space"
    if problem:
        raise AdapterError(f"bad adapter name {name!r}: it {problem}{hint}")
    return name


def write_files_manifest(path: Path, files: Sequence[str]) -> None:
    """Record the files an inject wrote (inside its staging folder: published by the swap)."""
    text = json.dumps({"written_by": "lora-export inject", "files": sorted(files)}, indent=2) + "\n"
    with open(path, "w", encoding="utf-8") as f:  # inside the staging folder: published by the swap
        f.write(text)


def read_files_manifest(path: Path) -> list[str]:
    """The file names an earlier inject recorded; nothing when the record is missing or unreadable.

    Only plain names of this folder count: an edited record cannot point the cleanup anywhere else."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 1 << 20:
            return []
        data = safejson.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        return []
    return [
        f
        for f in files
        if isinstance(f, str)
        and f not in ("", ".", "..", FILES_MANIFEST)
        and "/" not in f
        and "\\" not in f
        and "\x00" not in f
        and not f.startswith(STAGE_PREFIX)
    ]


def refuse_blocked_outputs(outputs: Sequence[Path]) -> None:
    """Refuse, before any work, outputs whose name is taken by a folder or a non-regular file."""
    for out in outputs:
        if out.is_dir():
            raise AdapterError(f"cannot write {out}: a folder of that name is in the way")
        check_output_file(out, AdapterError)

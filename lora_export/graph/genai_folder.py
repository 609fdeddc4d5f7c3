"""onnxruntime-genai model folders: what ``inject`` carries over so the output folder runs in that runtime.

The genai builder writes ``genai_config.json`` (which names the model file), the tokenizer files and a few
others beside ``model.onnx``. ``og.Model(folder)`` needs all of them, and ``og.Adapters`` loads our
``.onnx_adapter`` files as they are (their tensor names are the injected model's input names). So an inject
from such a folder copies every regular file the builder wrote except the model and its data (which inject
writes anew), and points ``genai_config.json`` at the injected model's file name when it differs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import safejson
from ..errors import ModelError

GENAI_CONFIG = "genai_config.json"
# Never copied: models and their data (inject writes its own), adapter files, hidden files.
_NOT_SIDE_FILES = (".onnx", ".data", ".onnx_adapter", ".safetensors")


def _filenames(node, found: list[str]) -> list[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "filename" and isinstance(value, str):
                found.append(value)
            else:
                _filenames(value, found)
    elif isinstance(node, list):
        for value in node:
            _filenames(value, found)
    return found


def _repointed(node, old: str, new: str):
    if isinstance(node, dict):
        return {k: (new if k == "filename" and v == old else _repointed(v, old, new)) for k, v in node.items()}
    if isinstance(node, list):
        return [_repointed(v, old, new) for v in node]
    return node


def genai_side_files(base_path: str | os.PathLike, skip: set[str]) -> dict | None:
    """The genai_config.json of the base model's folder when it names the base model, else None.

    Returns ``{"config": dict, "files": [Path, ...]}``: the files to copy (``skip``: names inject writes, and
    the base's external data files). Refuses a config that names other model files too (a pipeline: inject
    writes only the one model).
    """
    base = Path(base_path)
    cfg_path = base.parent / GENAI_CONFIG
    if not cfg_path.is_file():
        return None
    try:
        config = safejson.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{cfg_path}: not a readable genai_config.json ({type(e).__name__})") from None
    names = _filenames(config, [])
    if base.name not in names:
        return None
    others = sorted({n for n in names if n != base.name})
    if others:
        raise ModelError(
            f"{cfg_path} names other model files too ({', '.join(others[:3])}); inject writes only {base.name}, "
            "so the output folder would not run in onnxruntime-genai"
        )
    files = [
        p
        for p in sorted(base.parent.iterdir())
        if p.is_file()
        and not p.is_symlink()
        and not p.name.startswith(".")
        and not p.name.endswith(_NOT_SIDE_FILES)
        and p.name not in skip
        and p.name != GENAI_CONFIG
    ]
    return {"config": config, "files": files, "base_name": base.name}


def write_genai_side_files(side: dict, out_dir: Path, model_name: str) -> None:
    """Copy the side files into ``out_dir`` (a staging folder) and write genai_config.json naming ``model_name``."""
    for src in side["files"]:
        shutil.copyfile(src, out_dir / src.name)
    config = _repointed(side["config"], side["base_name"], model_name)
    with open(out_dir / GENAI_CONFIG, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=4) + "\n")

"""onnxruntime-genai model folders: what ``inject`` carries over so the output folder runs in that runtime.

The genai builder writes ``genai_config.json`` (which names the model file), the tokenizer files and a few
others beside ``model.onnx``. ``og.Model(folder)`` needs all of them, and ``og.Adapters`` loads our
``.onnx_adapter`` files as they are (their tensor names are the injected model's input names). So an inject
from such a folder copies every regular file the builder wrote except the model and its data (which inject
writes anew), links followed under ONNX Runtime's rule (``files.beside_model``: the Hugging Face cache's
layout works, a link out of the model's folders is refused), and points ``genai_config.json`` at the
injected model's file name when it differs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path

from .. import safejson
from ..errors import ModelError
from ..files.beside_model import outside_reason

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


def _side_file(base: Path, entry: Path) -> str | None:
    """The real path to copy for ``entry`` of the base model's folder (links followed under ONNX Runtime's
    rule), or None when it is not a file; a link that leaves the model's folders or dangles is refused."""
    if not entry.is_symlink():
        return str(entry) if entry.is_file() else None
    why = outside_reason(base, entry.name)
    if why is not None:
        raise ModelError(
            f"{entry} is a link outside the model's folder ({why}); inject copies the onnxruntime-genai "
            "folder's files, so replace the link with the file"
        )
    real = os.path.realpath(entry)
    if not os.path.exists(real):
        raise ModelError(f"{entry} is a broken link; the output folder would not run in onnxruntime-genai")
    return real if os.path.isfile(real) else None


def genai_side_files(base_path: str | os.PathLike, skip: set[str], data_files: Collection[Path] = ()) -> dict | None:
    """The genai_config.json of the base model's folder when it names the base model, else None.

    Returns ``{"config": dict, "files": [(name, real path), ...], "base_name": str}``: the files to copy
    (``skip``: names inject writes; ``data_files``: the base's external data, by real path, whatever its name
    in the folder). Links (the Hugging Face cache's
    ``snapshots/<rev>/tokenizer.json -> ../../blobs/<sha>``) are followed under ONNX Runtime's rule for
    external data (``files.beside_model``); one that leaves the model's folders is refused. Refuses a
    config that names other model files too (a pipeline: inject writes only the one model).
    """
    base = Path(base_path)
    cfg_path = base.parent / GENAI_CONFIG
    if not os.path.lexists(cfg_path):
        return None
    cfg_real = _side_file(base, cfg_path)
    if cfg_real is None:
        return None
    try:
        config = safejson.loads(Path(cfg_real).read_text(encoding="utf-8"))
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
    files, data = [], {Path(os.path.realpath(f)) for f in data_files}
    for p in sorted(base.parent.iterdir()):
        if p.name.startswith(".") or p.name.endswith(_NOT_SIDE_FILES) or p.name in skip or p.name == GENAI_CONFIG:
            continue
        real = _side_file(base, p)
        if real is not None and Path(real) not in data:
            files.append((p.name, real))
    return {"config": config, "files": files, "base_name": base.name}


def genai_file_names(side: dict) -> list[str]:
    """The names ``write_genai_side_files`` writes."""
    return [GENAI_CONFIG, *(name for name, _ in side["files"])]


def write_genai_side_files(side: dict, out_dir: Path, model_name: str) -> None:
    """Copy the side files into ``out_dir`` (a staging folder) and write genai_config.json naming ``model_name``."""
    for name, real in side["files"]:
        shutil.copyfile(real, out_dir / name)
    config = _repointed(side["config"], side["base_name"], model_name)
    with open(out_dir / GENAI_CONFIG, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=4) + "\n")

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

import os
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path

from lora_export import safejson
from lora_export.errors import ModelError, some
from lora_export.files.beside_model import outside_reason

GENAI_CONFIG = "genai_config.json"
# Never copied: models and their data (inject writes its own), adapter files, hidden files.
_NOT_SIDE_FILES = (".onnx", ".data", ".onnx_adapter", ".safetensors")


def _nodes(root) -> Iterator[dict | list]:
    """Every dict and list in a parsed JSON value, without recursion (a config may nest deeply)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            yield node
            stack.extend(node)


def _filenames(config) -> list[str]:
    """Every string value of a ``filename`` key, at any depth."""
    return [n["filename"] for n in _nodes(config) if isinstance(n, dict) and isinstance(n.get("filename"), str)]


def _repoint(config, old: str, new: str) -> None:
    """Set every ``filename`` that names ``old`` to ``new``, in place."""
    for node in list(_nodes(config)):
        if isinstance(node, dict) and node.get("filename") == old:
            node["filename"] = new


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
        why = f"{type(e).__name__}: {e.msg}" if isinstance(e, ValueError) and hasattr(e, "msg") else type(e).__name__
        raise ModelError(f"{cfg_path}: not a readable genai_config.json ({why})") from None
    names = _filenames(config)
    if base.name not in names:
        return None
    others = sorted({n for n in names if n != base.name})
    if others:
        raise ModelError(
            f"{cfg_path} names other model files too ({some(others)}); inject writes only {base.name}, "
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
    config = safejson.loads(safejson.dumps(side["config"]))  # a copy: side stays as read
    _repoint(config, side["base_name"], model_name)
    with open(out_dir / GENAI_CONFIG, "w", encoding="utf-8") as f:
        f.write(safejson.dumps(config, indent=4) + "\n")

"""Verifying an artifact built from an export folder of several ONNX files: inputs and references are
keyed ``<file>/<name>`` (``encoder_model.onnx/input_ids``, ``decoder_model.onnx/last_hidden_state``), each
file run on its own inputs (a decoder's ``encoder_hidden_states`` given, as the PyTorch model computes them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .recipe import RecipeError


def split_keys(arrays: Mapping[str, np.ndarray], what: str) -> dict[str, dict[str, np.ndarray]]:
    """``{"f.onnx/x": a}`` → ``{"f.onnx": {"x": a}}``; a key that names no file is refused."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        file, sep, name = key.partition(".onnx/")
        if not sep or not name:
            raise RecipeError(f"{what}: key {key!r} must be <model file>/<name> for a model folder")
        out.setdefault(f"{file}.onnx", {})[name] = arr
    return out


def verify_folder_step(step, folder: Path, inputs, references, atol: float, rtol: float, figures) -> dict:
    """Per adapter and file: run the file (with the adapter, for an injected folder) on that file's inputs
    and compare with the reference outputs named for it."""
    feeds = split_keys(inputs, "[verify] inputs")
    results: dict[str, list[dict]] = {}
    session = None
    if step.kind == "injected":
        from ..runtime.folder_session import LoraFolderSession

        session = LoraFolderSession(folder, providers=["CPUExecutionProvider"])
    for name in step.adapters:
        refs = split_keys(references[name], f"references for {name!r}")
        if session is not None:
            session.load_adapter(name)
        results[name] = []
        for file, expected in sorted(refs.items()):
            if not (folder / file).is_file():
                raise RecipeError(f"the reference for {name!r} names {file}, not a model file of the folder")
            if file not in feeds:
                raise RecipeError(f"[verify] inputs has none for {file} (keys {file}/<input name>)")
            wanted = sorted(expected)
            if session is not None:
                sess = session.session(file)
                known = {i.name for i in sess.get_inputs()}
                outs = session.run(file, wanted, {k: v for k, v in feeds[file].items() if k in known}, adapter=name)
            else:
                from ..runtime.verify import run_model

                _, by_name = run_model(folder / file, inputs=feeds[file], outputs=wanted)
                outs = [by_name[o] for o in wanted]
            results[name] += [figures(f"{file}/{o}", a, expected[o], atol, rtol) for o, a in zip(wanted, outs)]
    return results

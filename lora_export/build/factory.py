"""A recipe whose base is an export factory (``export = "mymodels:build"`` or ``"file.py:fn"``): the
base exported into the cache (keyed by the model the factory builds and its project's sources), its
example inputs as verification inputs, and reference outputs computed by the factory's PyTorch model with
each adapter attached.

torch is imported here only, and only for such recipes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import LoraExportError
from . import cache as cachelib


def _spec_at(spec: str, root: Path) -> str:
    """A ``file.py:fn`` spec made absolute against the recipe's folder; a module spec unchanged."""
    from ..exporting.factory import is_file_spec, split_spec

    source, func = split_spec(spec)
    return f"{(root / source).absolute()}:{func}" if is_file_spec(source) else spec


@contextlib.contextmanager
def _importable_from(root: Path) -> Iterator[None]:
    # Module factories are found beside the recipe, as `export` finds them in the current folder.
    folder = str(root.absolute())
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _source_file(spec: str, root: Path) -> Path:
    """The factory's source file, found without running it."""
    from ..exporting.factory import is_file_spec, split_spec

    source, _ = split_spec(spec)
    if is_file_spec(source):
        path = root / source
    else:
        with _importable_from(root):
            try:
                found = importlib.util.find_spec(source)
            except (ImportError, ValueError):
                found = None
        if found is None or not found.origin or not Path(found.origin).is_file():
            raise LoraExportError(f"cannot find the module {source!r} of the export factory (beside the recipe)")
        path = Path(found.origin)
    if not path.is_file():
        raise LoraExportError(f"no export factory file at {path}")
    return path


def _factory(spec: str, root: Path):
    from ..exporting.factory import load_factory

    with _importable_from(root):
        return load_factory(_spec_at(spec, root))


def _sources_digest(source: Path) -> str:
    """sha256 over the Python files of the factory's project: every ``.py`` below the factory file's folder
    (hidden folders and ``__pycache__`` left out), so an edited module the factory imports changes the key."""
    h = hashlib.sha256()
    root = source.parent
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("__pycache__", "site-packages"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                p = Path(dirpath) / name
                h.update(f"{p.relative_to(root).as_posix()}\0{cachelib.file_sha256(p)}\n".encode())
    return h.hexdigest()


def _tensors_digest(h, label: str, value) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{label}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        for k in sorted(value, key=str):
            _tensors_digest(h, f"{label}.{k}", value[k])
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _tensors_digest(h, f"{label}[{i}]", v)
    else:
        h.update(f"{label}\0{value!r}\n".encode())


def _model_digest(model, inputs, kwargs) -> str:
    """sha256 of what the factory built: every parameter and buffer, the example inputs, the export options.
    A factory that loads other weights, or builds another model, gets another key."""
    h = hashlib.sha256()
    _tensors_digest(h, "state", dict(model.state_dict()))
    _tensors_digest(h, "inputs", inputs)
    _tensors_digest(h, "kwargs", {k: v for k, v in kwargs.items() if k != "path"})
    return h.hexdigest()


def exported_base(spec: str, root: Path, cache: Path, phase) -> Path:
    """The factory's base model exported to ONNX, cached by what the factory builds.

    The key holds the factory's model (its weights, example inputs and export options), the Python files of
    its project and the versions of torch and transformers: the factory runs each build (building a model is
    cheap next to exporting it), so a changed checkpoint or module cannot leave a stale export "up to date"."""
    from importlib import metadata

    source = _source_file(spec, root)
    with phase(f"running {spec}"):
        model, inputs, kwargs = _factory(spec, root)
    try:
        transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = None
    key = cachelib.key_of(
        {
            "tool": __version__,
            "export": spec,
            "sources": _sources_digest(source),
            "model": _model_digest(model, inputs, kwargs),
            "torch": metadata.version("torch"),
            "transformers": transformers,
        }
    )
    model_path = cache / key / "files" / "model.onnx"
    if cachelib.lookup(cache, key) is not None:
        return model_path
    from ..exporting.exporter import export_with_manifest

    with phase(f"exporting {spec}"):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("path",)}
        with cachelib.new_entry(cache, key) as tmp:
            try:
                export_with_manifest(model, inputs, tmp / "files" / "model.onnx", **kwargs)
            except TypeError as e:
                raise LoraExportError(f"bad export arguments from {spec}: {e}") from None
            cachelib.write_entry(tmp, {"key": key, "export": spec})
    return model_path


def example_inputs(spec: str, root: Path) -> dict[str, np.ndarray]:
    """The factory's example inputs as verification feeds (they must be a dict of tensors)."""
    import torch

    _, inputs, _ = _factory(spec, root)
    if not isinstance(inputs, Mapping) or not all(isinstance(v, torch.Tensor) for v in inputs.values()):
        raise LoraExportError(f"{spec}'s example inputs are not a dict of tensors: give [verify] inputs (an .npz)")
    return {k: v.detach().cpu().numpy() for k, v in inputs.items()}


def computed_references(
    spec: str, root: Path, base: Path, inputs: Mapping[str, np.ndarray], adapters: Mapping[str, Path]
) -> dict[str, dict[str, np.ndarray]]:
    """Per adapter: the factory's PyTorch model with the adapter attached, run on ``inputs``; outputs named
    as the exporter names them (``logits`` ...)."""
    import onnx
    import torch

    from ..exporting.shapes import output_leaves
    from ..formats.peft import load_adapter
    from ..training.attach import attach_lora

    outputs = {o.name for o in onnx.load_model(str(base), load_external_data=False).graph.output}
    model, _, _ = _factory(spec, root)
    feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    out = {}
    for name, path in adapters.items():
        m = attach_lora(copy.deepcopy(model).eval(), load_adapter(path), verbose=False)
        with torch.no_grad():
            try:
                result = m(**feeds)
            except Exception as e:  # noqa: BLE001 - the user's model raises anything
                raise LoraExportError(f"{spec}'s model failed on the verification inputs: {type(e).__name__}") from None
        leaves = output_leaves(result)
        if leaves is None:
            raise LoraExportError(f"{spec}'s model outputs cannot be named: give [verify] references (.npz)")
        # Outputs the exporter left out (a cache the graph does not return) are not compared.
        out[name] = {n: t.detach().cpu().numpy() for n, t in zip(*leaves) if n in outputs}
    return out

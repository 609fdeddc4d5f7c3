"""ONNX helpers for merge tests: export a (deep-copied) torch model, run with onnxruntime, hash files."""

from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Wrapped(nn.Module):
    """Puts a model one level down, so every parameter path gains an ``inner.`` prefix."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        # Explicit arguments: torch.export does not accept a **kwargs forward.
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class _FirstOutput(nn.Module):
    # HF models return ModelOutput objects; export only the first tensor, by keyword inputs.
    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)))
        return out if isinstance(out, torch.Tensor) else out[0]


def export_onnx(model: nn.Module, inputs: dict, path: Path, *, dynamo: bool, external: bool = False) -> Path:
    """Export a deepcopy of ``model`` (the tracer may change module state) to ``path``."""
    m = copy.deepcopy(model).eval()
    for sub in m.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False
    names = list(inputs)
    args = tuple(inputs[n] for n in names)
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            # Keyword inputs keep the module tree as is (no wrapper prefix in scopes or names).
            prog = torch.onnx.export(m, (), kwargs=dict(inputs), dynamo=True, verbose=False)
            prog.save(str(path), external_data=external)
        else:
            torch.onnx.export(
                _FirstOutput(m, names), args, str(path), input_names=names, output_names=["out"], dynamo=False
            )
            if external:
                import onnx

                proto = onnx.load(str(path))
                onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def run_onnx(path: Path, inputs: dict) -> np.ndarray:
    """The first output of the model at ``path`` on ``inputs`` (onnxruntime, CPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    return sess.run(None, feed)[0]


def file_hashes(*paths: Path) -> dict[str, str]:
    """sha256 of every file in the given files' folders (inputs must stay untouched)."""
    out = {}
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("*")) if p.is_dir() else sorted(p.parent.glob(p.name + "*"))
        for f in files:
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out

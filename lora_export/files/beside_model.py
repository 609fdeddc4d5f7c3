"""Which files a model may read beside it: ONNX Runtime's rule for external data, applied by every reader.

ONNX Runtime (``ValidateExternalDataPathFromDir`` in onnxruntime/core/framework/tensorprotoutils.cc; its
tests in onnxruntime/test/python/onnxruntime_test_python_symlink_data.py) refuses an absolute location,
then resolves ``<model's folder as given>/<location>`` with all symlinks followed and accepts it only under
the model's folder as given (itself resolved) or under the folder of the model file's real path; anything
else fails with "External data path validation failed". The second folder is what makes the Hugging Face
cache work: ``snapshots/<rev>/model.onnx -> ../../blobs/<sha>`` with its data linked into the same
``blobs`` folder. Hard links are plain files of the folder and pass. Measured against onnxruntime 1.31
(tests/test_beside_model.py compares both on every layout).

We apply the same rule to the genai side files ``inject`` copies, so a link in a model folder can never
pull an unrelated file into an output.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath

__all__ = ["absolute", "model_folders", "outside_reason"]


def absolute(path: str | os.PathLike) -> str:
    """``path`` made absolute without lexical normalization: ``link/..`` keeps meaning what the kernel reads
    (the link target's parent), which ``os.path.abspath`` would fold away."""
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def model_folders(model_path: str | os.PathLike) -> tuple[str, ...]:
    """The folders (real paths) a model may read from: its folder as given, and its real file's folder."""
    path = absolute(model_path)
    given = os.path.realpath(os.path.dirname(path))
    real = os.path.dirname(os.path.realpath(path))
    return (given,) if real == given else (given, real)


def _inside(path: str, folder: str) -> bool:
    # Component-wise, as ONNX Runtime compares: /m2/x is not inside /m.
    return os.path.commonpath([path, folder]) == folder


def outside_reason(model_path: str | os.PathLike, location: str) -> str | None:
    """Why ONNX Runtime would refuse to read ``location`` for the model at ``model_path`` (None: allowed).

    ``location`` is relative to the model's folder as given. Stricter than ONNX Runtime only where a
    location would escape on Windows (backslashes, drive letters), so such a model is refused everywhere.
    """
    if not isinstance(location, str) or not location:
        return "empty location"
    if "\0" in location:
        return "location contains a NUL byte"
    if location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
        return "absolute location"
    if "\\" in location:
        # On Windows these are separators: a location that climbs out there is refused here too.
        depth = 0
        for part in PurePosixPath(location.replace("\\", "/")).parts:
            depth += -1 if part == ".." else 0 if part == "." else 1
            if depth < 0:
                return "location leaves the model's folder"
    folder = os.path.dirname(absolute(model_path))
    target = os.path.realpath(os.path.join(folder, location))
    allowed = model_folders(model_path)
    if any(_inside(target, a) for a in allowed):
        return None
    where = " nor ".join(repr(a) for a in allowed)
    return f"it resolves to {target!r}, {'under neither ' if len(allowed) > 1 else 'not under '}{where}"

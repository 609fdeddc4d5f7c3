"""Run two ONNX models (or one model and saved reference outputs) on the same inputs and compare.

This is the gate a pipeline puts after a merge: every output must agree within ``rtol``/``atol``
(``|a - b| <= atol + rtol·|b|``, numpy's allclose with B as the reference). Inputs come from an
``.npz``/dict or are generated from the graph's input types: token ids small ints, attention masks
ones, token type ids zeros, floats standard normal; symbolic dimensions batch 2, sequence 8.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LoraExportError, ModelError, first_line
from ..files.checks import require_regular_file

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass
class OutputComparison:
    """How one output of A compares with B (the reference)."""

    name: str
    shape: list[int]
    dtype: str
    max_abs: float | None  # None when the shapes differ: there is no elementwise error
    max_rel: float | None
    mismatched: int
    allclose: bool
    detail: str = ""
    reference_shape: list[int] | None = None  # set when it differs from ``shape``

    @property
    def shape_mismatch(self) -> bool:
        return self.reference_shape is not None


@dataclass
class VerifyReport:
    """Everything ``verify`` found; ``to_dict()`` is JSON-able."""

    a: str
    b: str
    rtol: float
    atol: float
    seed: int
    inputs: dict[str, dict] = field(default_factory=dict)
    outputs: list[OutputComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.allclose for o in self.outputs)

    @property
    def failed(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.allclose]

    def to_dict(self) -> dict:
        d = asdict(self)
        for o, od in zip(self.outputs, d["outputs"]):
            od["shape_mismatch"] = o.shape_mismatch
        d["criterion"] = self.criterion()
        d["passed"] = self.passed
        return d

    def criterion(self) -> str:
        """The pass rule, with the tolerances filled in."""
        return f"|a - b| <= atol + rtol * |b| elementwise (b: the reference), rtol={self.rtol:g}, atol={self.atol:g}"

    def summary(self) -> str:
        """One line: what failed, or that everything agreed."""
        worst = max((o.max_abs for o in self.outputs if o.max_abs is not None), default=0.0)
        if self.passed:
            tol = f"rtol {self.rtol:g}, atol {self.atol:g}"
            return f"{len(self.outputs)} output(s) agree (max abs error {worst:.3g}, {tol})"
        names = ", ".join(o.name + (" (shape mismatch)" if o.shape_mismatch else "") for o in self.failed)
        return (
            f"{len(self.failed)} of {len(self.outputs)} output(s) differ beyond rtol {self.rtol:g}, "
            f"atol {self.atol:g}: {names} (max abs error {worst:.3g})"
        )


def verify_models(
    a: str | os.PathLike,
    b: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    providers: Sequence[str] | None = None,
    dims: Mapping[str, int] | None = None,
    save_outputs: str | os.PathLike | None = None,
    outputs: Sequence[str] | None = None,
) -> VerifyReport:
    """Compare model ``a`` with model ``b``, or with reference outputs (``.npy`` paths).

    ``b`` is a model path, or a list of ``.npy`` files (matched to outputs by file stem, else by
    order), or a dict output name → ``.npy`` path. ``inputs``: a dict or an ``.npz`` path; missing
    means random inputs from ``seed``, with ``dims`` overriding symbolic dimensions by name.
    ``save_outputs``: a folder to write ``a``'s outputs (``<output>.npy``) and ``inputs.npz`` into,
    to verify against later. ``outputs``: compare only these outputs (by name). ``dims`` may name only
    symbolic dimensions of ``a``'s inputs. Raises LoraExportError for bad input; never raises on
    disagreement.
    """
    # NaN passes a "< 0" check and makes every comparison pass: refuse it as well.
    if not (math.isfinite(rtol) and math.isfinite(atol)) or rtol < 0 or atol < 0:
        raise LoraExportError(f"rtol and atol must be finite and non-negative, got rtol={rtol}, atol={atol}")
    session_a = _session(a, providers)
    names = select_outputs(session_a, outputs, a)
    feeds = _feeds(session_a, inputs, seed, dims or {}, a)
    outputs_a = _run(session_a, feeds, a, names)
    if isinstance(b, (str, os.PathLike)) and not str(b).endswith(".npy"):
        session_b = _session(b, providers)
        _check_same_io(session_a, session_b, a, b)
        outputs_b = _run(session_b, feeds, b, names)
        b_label = str(b)
    else:
        refs = _reference_paths(b, names, subset=bool(outputs))
        outputs_b = [_load_npy(refs[n]) for n in names]
        b_label = ", ".join(str(refs[n]) for n in names)
    if save_outputs is not None:
        save_reference(save_outputs, names, outputs_a, feeds)
    report = VerifyReport(str(a), b_label, float(rtol), float(atol), int(seed))
    report.inputs = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype), "source": "random" if inputs is None else "given"}
        for k, v in feeds.items()
    }
    report.outputs = [compare(n, x, y, rtol=rtol, atol=atol) for n, x, y in zip(names, outputs_a, outputs_b)]
    return report


def select_outputs(session, wanted: Sequence[str] | None, path) -> list[str]:
    """The output names to compare: all of the model's, or ``wanted`` (each must be one of them)."""
    names = [o.name for o in session.get_outputs()]
    if not wanted:
        return names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise LoraExportError(f"{path} has no output {unknown[0]!r}; its outputs: {', '.join(names)}")
    return list(dict.fromkeys(wanted))


def symbolic_dims(specs) -> list[str]:
    """The names of the symbolic dimensions in ONNX Runtime input specs, in order of appearance."""
    found = [d for spec in specs for d in (spec.shape or ()) if isinstance(d, str) and d]
    return list(dict.fromkeys(found))


def check_dims(specs, dims: Mapping[str, int], path="the model") -> None:
    """Refuse a --dim for a name that is not a symbolic dimension of the model's inputs."""
    known = symbolic_dims(specs)
    for name in dims:
        if name not in known:
            have = ", ".join(known) if known else "none: every input dimension is fixed"
            raise LoraExportError(f"--dim {name}: not a symbolic dimension of {path}'s inputs (symbolic: {have})")


def run_model(
    path: str | os.PathLike,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    seed: int = 0,
    providers: Sequence[str] | None = None,
    dims: Mapping[str, int] | None = None,
    outputs: Sequence[str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run one model: (inputs used, outputs by name; only ``outputs`` where given)."""
    session = _session(path, providers)
    names = select_outputs(session, outputs, path)
    feeds = _feeds(session, inputs, seed, dims or {}, path)
    outs = _run(session, feeds, path, names)
    return feeds, dict(zip(names, outs))


def compare(name: str, a: np.ndarray, b: np.ndarray, *, rtol: float, atol: float) -> OutputComparison:
    """Compare ``a`` with the reference ``b``: max abs error, max relative error, allclose."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        # No elementwise error exists: reported as a shape mismatch, not as an infinite error.
        return OutputComparison(
            name, list(a.shape), str(a.dtype), None, None, int(max(a.size, b.size)), False,
            f"shape mismatch: {list(a.shape)} vs reference {list(b.shape)}", list(b.shape),
        )  # fmt: skip
    x, y = a.astype(np.float64), b.astype(np.float64)
    close = np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
    both = np.isfinite(x) & np.isfinite(y)
    diff = np.abs(x - y)[both]
    # Relative error floors the denominator at atol so that near-zero references don't dominate it.
    rel = diff / np.maximum(np.abs(y[both]), max(atol, np.finfo(np.float64).tiny))
    detail = ""
    if not np.array_equal(np.isfinite(x), np.isfinite(y)):
        detail = "NaN/Inf at different positions"
    return OutputComparison(
        name=name,
        shape=list(a.shape),
        dtype=str(a.dtype),
        max_abs=float(diff.max()) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        mismatched=int((~close).sum()),
        allclose=bool(close.all()),
        detail=detail,
    )


def save_reference(
    folder: str | os.PathLike, names: Sequence[str], outputs: Sequence[np.ndarray], feeds: Mapping[str, np.ndarray]
) -> list[Path]:
    """Write ``<output>.npy`` per output and the ``inputs.npz`` that produced them.

    All are written first into a staging folder inside ``folder``, then renamed in one by one: a failure
    (a full disk) leaves no file, and no folder this call created."""
    from ..files.atomic import temp_dir
    from ..files.checks import check_output_file
    from ..files.staging import file_mode

    folder = Path(folder)
    files = [f"{safe_name(name)}.npy" for name in names] + ["inputs.npz"]
    for f in files:
        check_output_file(folder / f)
    with temp_dir(folder) as stage:
        for f, arr in zip(files, outputs):
            with open(stage / f, "wb") as fh:
                np.save(fh, arr)
        with open(stage / "inputs.npz", "wb") as fh:
            np.savez(fh, **dict(feeds))
        for f in files:
            os.chmod(stage / f, file_mode())
            os.replace(stage / f, folder / f)
    return [folder / f for f in files]


def safe_name(name: str) -> str:
    """An output name usable as a file stem (``logits``, ``onnx__Add_3`` ...)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "output"


# -- inputs ------------------------------------------------------------------------------------


def _feeds(session, inputs, seed: int, dims: Mapping[str, int], path="the model") -> dict[str, np.ndarray]:
    specs = session.get_inputs()
    check_dims(specs, dims, path)
    if inputs is None:
        return random_inputs(specs, seed=seed, dims=dims)
    given = _load_inputs(inputs)
    want = [s.name for s in specs]
    missing = [n for n in want if n not in given]
    extra = [n for n in given if n not in want]
    if missing or extra:
        raise LoraExportError(
            f"inputs do not match the model's: missing {missing or 'none'}, unexpected {extra or 'none'} "
            f"(model inputs: {want})"
        )
    feeds = {}
    for spec in specs:
        arr = np.asarray(given[spec.name])
        want_dtype = _ORT_TYPES.get(spec.type)
        if want_dtype is not None and arr.dtype != want_dtype:
            if arr.dtype.kind != np.dtype(want_dtype).kind:
                raise LoraExportError(f"input {spec.name!r} has dtype {arr.dtype}, the model wants {spec.type}")
            arr = arr.astype(want_dtype)
        feeds[spec.name] = arr
    return feeds


def _load_inputs(inputs) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        return {str(k): np.asarray(v) for k, v in inputs.items()}
    path = require_regular_file(inputs, "inputs file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("not an .npz archive")
            return {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a bad archive
        raise LoraExportError(f"{path}: not a readable .npz of inputs ({type(e).__name__}: {first_line(e)})") from None


def random_inputs(specs, *, seed: int = 0, dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Inputs from ONNX Runtime input specs (name, type, shape), deterministic in ``seed``."""
    dims = dict(dims or {})
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = _ORT_TYPES.get(spec.type)
        if dtype is None:
            raise LoraExportError(f"input {spec.name!r}: cannot generate {spec.type}; pass --inputs")
        shape = tuple(_dim(d, i, dims) for i, d in enumerate(spec.shape or ()))
        name = spec.name.lower()
        if np.dtype(dtype).kind == "f":
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_ or "mask" in name:
            arr = np.ones(shape, dtype=dtype)
        elif "token_type" in name or "segment" in name:
            arr = np.zeros(shape, dtype=dtype)
        elif "position" in name and shape:
            arr = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        else:
            arr = rng.integers(0, 100, size=shape).astype(dtype)
        feeds[spec.name] = arr
    return feeds


def _dim(d, axis: int, dims: Mapping[str, int]) -> int:
    if isinstance(d, int) and d >= 0:
        return d
    name = str(d) if d is not None else ""
    if name in dims:
        return int(dims[name])
    low = name.lower()
    if "batch" in low:
        return 2
    if any(k in low for k in ("seq", "len", "token", "time")):
        return 8
    # Exporters often name dims s0, s1 ...: by position, the first is the batch, the second a sequence.
    return {0: 2, 1: 8}.get(axis, 1)


# -- running -----------------------------------------------------------------------------------


def _session(path, providers):
    import onnxruntime as ort

    from ..graph.model_io import load_model

    # ONNX Runtime reads external data on its own: check the model's references as for any load first.
    path = Path(path)
    load_model(path)
    options = ort.SessionOptions()
    # Fatal only: warnings (unused initializers) are noise, and errors (e.g. a Gather index out of range)
    # come back as exceptions that we report in one line; ORT's own log would add more lines on stderr.
    options.log_severity_level = 4
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # noqa: BLE001 - ORT raises its own types for a corrupt or invalid model
        raise ModelError(f"{path}: ONNX Runtime cannot load the model ({type(e).__name__}: {first_line(e)})") from None


def _run(session, feeds, path, names: Sequence[str] | None = None) -> list[np.ndarray]:
    try:
        return [np.asarray(x) for x in session.run(list(names) if names else None, dict(feeds))]
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{path}: inference failed ({type(e).__name__}: {first_line(e)})") from None


def _check_same_io(sa, sb, a, b) -> None:
    ins_a, ins_b = sorted(i.name for i in sa.get_inputs()), sorted(i.name for i in sb.get_inputs())
    if ins_a != ins_b:
        raise LoraExportError(f"{a} and {b} have different inputs: {ins_a} vs {ins_b}")
    outs_a, outs_b = [o.name for o in sa.get_outputs()], [o.name for o in sb.get_outputs()]
    if outs_a != outs_b:
        raise LoraExportError(f"{a} and {b} have different outputs: {outs_a} vs {outs_b}")


def _reference_paths(refs, names: Sequence[str], subset: bool = False) -> dict[str, Path]:
    # ``subset``: ``names`` are the selected outputs; reference files named after other outputs may be given.
    if isinstance(refs, (str, os.PathLike)):
        refs = [refs]
    if isinstance(refs, Mapping):
        mapping = {str(k): Path(v) for k, v in refs.items()}
    else:
        paths = [Path(p) for p in refs]
        by_stem = {p.stem: p for p in paths}
        if all(safe_name(n) in by_stem for n in names) and (len(paths) == len(names) or subset):
            mapping = {n: by_stem[safe_name(n)] for n in names}
        elif len(paths) == len(names):
            mapping = dict(zip(names, paths))
        else:
            raise LoraExportError(f"{len(paths)} reference file(s) for {len(names)} model output(s) {list(names)}")
    missing = [n for n in names if n not in mapping]
    if missing:
        raise LoraExportError(f"no reference for output(s) {missing}")
    return mapping


def _load_npy(path: Path) -> np.ndarray:
    require_regular_file(path, "reference file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise LoraExportError(f"{path}: not a readable .npy ({type(e).__name__}: {first_line(e)})") from None

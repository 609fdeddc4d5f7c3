"""Run two ONNX models (or one model and saved reference outputs) on the same inputs and compare.

This is the gate a pipeline puts after a merge: every output must agree within ``rtol``/``atol``
(``|a - b| <= atol + rtol·|b|``, numpy's allclose with B as the reference). Inputs come from an
``.npz``/dict or are generated from the graph's input types (``verify_inputs``: token ids within the
vocabulary the model's embedding states). ``adapter``: model A is an injected model, run with that
adapter's tensors in its LoRA slots (``LoraSession``), so a served adapter is checked against a merged
model or reference outputs.
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
from .verify_inputs import check_dims, model_feeds, random_inputs, symbolic_dims

__all__ = [
    "OutputComparison",
    "VerifyReport",
    "check_dims",
    "check_providers",
    "compare",
    "random_inputs",
    "run_model",
    "save_reference",
    "select_outputs",
    "symbolic_dims",
    "verify_models",
]

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


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
    adapter: str | None = None  # the adapter A ran with (A an injected model), or None

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
        if self.passed:
            worst = max((o.max_abs for o in self.outputs if o.max_abs is not None), default=0.0)
            tol = f"rtol {self.rtol:g}, atol {self.atol:g}"
            return f"{len(self.outputs)} output(s) agree (max abs error {worst:.3g}, {tol})"
        names = ", ".join(o.name + (" (shape mismatch)" if o.shape_mismatch else "") for o in self.failed)
        # Outputs of another shape have no elementwise error: the figure covers the others, or is left out.
        errors = [o.max_abs for o in self.failed if o.max_abs is not None]
        worst = f" (max abs error {max(errors):.3g})" if errors else ""
        return (
            f"{len(self.failed)} of {len(self.outputs)} output(s) differ beyond rtol {self.rtol:g}, "
            f"atol {self.atol:g}: {names}{worst}"
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
    adapter: str | os.PathLike | None = None,
) -> VerifyReport:
    """Compare model ``a`` with model ``b``, or with reference outputs (``.npy`` paths).

    ``b`` is a model path, or a list of ``.npy`` files (matched to outputs by file stem, else by
    order), or a dict output name → ``.npy`` path. ``inputs``: a dict or an ``.npz`` path; missing
    means random inputs from ``seed``, with ``dims`` overriding symbolic dimensions by name.
    ``save_outputs``: a folder to write ``a``'s outputs (``<output>.npy``) and ``inputs.npz`` into,
    to verify against later. ``outputs``: compare only these outputs (by name). ``dims`` may name only
    symbolic dimensions of ``a``'s inputs. ``adapter``: ``a`` is an injected model, run with this
    adapter (an ``.onnx_adapter``/``.safetensors`` slot file or a PEFT folder) in its slots. Raises
    LoraExportError for bad input; never raises on disagreement.
    """
    # NaN passes a "< 0" check and makes every comparison pass: refuse it as well.
    if not (math.isfinite(rtol) and math.isfinite(atol)) or rtol < 0 or atol < 0:
        raise LoraExportError(f"rtol and atol must be finite and non-negative, got rtol={rtol}, atol={atol}")
    model_a = _open(a, providers, adapter)
    names = select_outputs(model_a.session, outputs, a)
    model_b = None
    if isinstance(b, (str, os.PathLike)) and not str(b).endswith(".npy"):
        model_b = _open(b, providers)
        _check_same_io(model_a.session, model_b.session, a, b)
    bounds = _common_bounds(model_a, model_b)
    feeds = model_feeds(model_a.session.get_inputs(), inputs, seed, dims or {}, a, bounds)
    outputs_a = model_a.run(feeds, names, random=inputs is None)
    if model_b is not None:
        outputs_b = model_b.run(feeds, names, random=inputs is None)
        b_label = str(b)
    else:
        refs = _reference_paths(b, names, subset=bool(outputs))
        outputs_b = [_load_npy(refs[n]) for n in names]
        b_label = ", ".join(str(refs[n]) for n in names)
    if save_outputs is not None:
        save_reference(save_outputs, names, outputs_a, feeds)
    report = VerifyReport(str(a), b_label, float(rtol), float(atol), int(seed))
    report.adapter = None if adapter is None else str(adapter)
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


def run_model(
    path: str | os.PathLike,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    seed: int = 0,
    providers: Sequence[str] | None = None,
    dims: Mapping[str, int] | None = None,
    outputs: Sequence[str] | None = None,
    adapter: str | os.PathLike | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run one model (with ``adapter`` in its slots, if given): (inputs used, outputs by name; only
    ``outputs`` where given)."""
    model = _open(path, providers, adapter)
    names = select_outputs(model.session, outputs, path)
    feeds = model_feeds(model.session.get_inputs(), inputs, seed, dims or {}, path, model.id_bounds)
    outs = model.run(feeds, names, random=inputs is None)
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


# -- running -----------------------------------------------------------------------------------


def check_providers(providers: Sequence[str | tuple[str, dict]] | None) -> list[str | tuple[str, dict]]:
    """The providers to run on (default: the CPU); one that this ONNX Runtime lacks is refused, listing
    those it has (ONNX Runtime itself would fall back to the CPU and say so on stderr)."""
    import onnxruntime as ort

    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    for p in providers:
        name = p[0] if isinstance(p, tuple) else p
        if name not in available:
            raise LoraExportError(
                f"provider {name!r} is not available in this ONNX Runtime; available: {', '.join(available)}"
            )
    return providers


@dataclass
class _Model:
    """A model opened for verify: an ONNX Runtime session, or a ``LoraSession`` with the adapter loaded."""

    path: Path
    session: object
    id_bounds: dict[str, int | None]
    served: bool = False

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str], random: bool) -> list[np.ndarray]:
        try:
            if self.served:
                outs = self.session.run(list(names), dict(feeds), adapter=_ADAPTER)
            else:
                outs = self.session.run(list(names) if names else None, dict(feeds))
            return [np.asarray(x) for x in outs]
        except Exception as e:  # noqa: BLE001 - ORT raises its own types; LoraSession a LoraExportError
            hint = "; the inputs were random: pass --inputs with values the model accepts" if random else ""
            raise ModelError(f"{self.path}: inference failed ({type(e).__name__}: {first_line(e)}){hint}") from None


_ADAPTER = "verify"


def _open(path, providers, adapter=None) -> _Model:
    from ..graph.model.model_io import load_model
    from .token_ids import token_id_bounds

    providers = check_providers(providers)
    # ONNX Runtime reads external data on its own: check the model's references as for any load first.
    path = Path(path)
    bounds = token_id_bounds(load_model(path))
    if adapter is not None:
        from .session import LoraSession

        lora = LoraSession(path, providers=providers)
        lora.load_adapter(_ADAPTER, adapter)
        return _Model(path, lora, bounds, served=True)
    return _Model(path, _session(path, providers), bounds)


def _common_bounds(a: _Model, b: _Model | None) -> dict[str, int | None]:
    """Token id bounds both models accept (the smaller table; unknown only where neither states one)."""
    out = dict(a.id_bounds)
    for name, bound in (b.id_bounds if b is not None else {}).items():
        have = out.get(name)
        out[name] = bound if have is None else (have if bound is None else min(have, bound))
    return out


def _session(path: Path, providers):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Fatal only: warnings (unused initializers) are noise, and errors (e.g. a Gather index out of range)
    # come back as exceptions that we report in one line; ORT's own log would add more lines on stderr.
    options.log_severity_level = 4
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises its own types for a corrupt or invalid model
        raise ModelError(f"{path}: ONNX Runtime cannot load the model ({type(e).__name__}: {first_line(e)})") from None


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

"""Building one artifact of a plan into a folder (through the merge and inject library functions), and
verifying it against reference outputs with ONNX Runtime."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import LoraExportError
from .recipe import RecipeError


@dataclasses.dataclass(frozen=True)
class Step:
    """One unit of DIST: ``where`` (``merged/a1``, ``injected``) built from ``adapters`` with ``options``."""

    where: str
    kind: str
    adapters: tuple[str, ...]
    options: dict
    key: str = ""
    provenance: dict = dataclasses.field(default_factory=dict)
    folder: bool = False  # the base is an export folder of several ONNX files


def _merge_options(opts: Mapping) -> dict:
    """The recipe's merged-artifact options as ``merge_file`` / ``merge_folder`` keywords."""
    return {
        "scale": opts.get("scale", 1.0),
        "allow_partial": opts.get("allow_partial", False),
        "only_targets": opts.get("only_targets"),
        "requantize": opts.get("requantize", False),
        "into_float": opts.get("into_float", False),
    }


def build_step(step: Step, base: Path, adapters: Mapping[str, Path], base_weights: Path | None, out: Path) -> dict:
    """Write ``step``'s files into the empty folder ``out``; returns a summary of what was done."""
    opts = step.options
    inject_opts = {"dora": opts.get("dora", False), "only_targets": opts.get("only_targets")}
    paths = [adapters[a] for a in step.adapters]
    if step.folder:
        from ..graph.verbs.folder_ops import inject_folder, merge_folder

        if step.kind == "merged":
            result = merge_folder(base, paths[0], out, base_weights=base_weights, **_merge_options(opts))
        elif step.kind == "injected":
            result = inject_folder(
                base, paths, out, names=list(step.adapters), base_weights=base_weights, **inject_opts
            )
        else:
            raise RecipeError(f"artifact kind {step.kind!r} is not available for a model folder in this version")
        return {"files": sorted(result.reports)}
    if step.kind == "merged":
        from ..graph.verbs.merge import merge_file

        report = merge_file(base, paths[0], out / "model.onnx", base_weights=base_weights, **_merge_options(opts))
        counts = report.to_dict()["counts"]
        return {"merged_weights": counts["merged_weights"], "targets": counts["targets"]}
    if step.kind in ("injected", "per-row"):
        from ..graph.verbs.inject import inject_files

        if step.kind == "per-row" and not per_row_available():
            raise RecipeError("artifact kind 'per-row' is not available in this version (inject --per-row)")
        result = inject_files(
            base,
            paths,
            out,
            base_weights=base_weights,
            names=list(step.adapters),
            **inject_opts,
            **({"per_row": True} if step.kind == "per-row" else {}),
        )
        return {"slots": len(result.manifest.slots)}
    raise RecipeError(f"artifact kind {step.kind!r} is not available in this version")


def per_row_available() -> bool:
    """Whether this version's inject has ``per_row`` (``inject --per-row``)."""
    import inspect

    from ..graph.verbs.inject import inject_files

    return "per_row" in inspect.signature(inject_files).parameters


def load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """An .npz's arrays by name (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("not an .npz archive")
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise LoraExportError(f"no {what} at {path}") from None
    except Exception as e:  # noqa: BLE001 - numpy raises several types for a bad archive
        raise LoraExportError(f"{path}: not a readable .npz of {what} ({type(e).__name__})") from None


def _figures(name: str, actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> dict:
    from ..runtime.verify import compare

    c = compare(name, actual, expected, rtol=rtol, atol=atol)
    # Rounded: the manifest records what was found, not float noise beyond it.
    return {
        "output": name,
        "shape": c.shape,
        "max_abs": None if c.max_abs is None else float(f"{c.max_abs:.4g}"),
        "max_rel": None if c.max_rel is None else float(f"{c.max_rel:.4g}"),
        "mismatched": c.mismatched,
        "passed": c.allclose,
        **({"detail": c.detail} if c.detail else {}),
    }


def verify_step(
    step: Step,
    folder: Path,
    inputs: Mapping[str, np.ndarray],
    references: Mapping[str, Mapping[str, np.ndarray]],
    atol: float,
    rtol: float,
) -> dict:
    """Run ``step``'s model(s) on ``inputs``, per adapter, and compare with that adapter's reference outputs.

    Returns ``{"passed": bool, "adapters": {name: [figures per output]}}``."""
    results: dict[str, list[dict]] = {}
    if step.folder:
        from .folder_steps import verify_folder_step

        results = verify_folder_step(step, folder, inputs, references, atol, rtol, _figures)
    elif step.kind == "merged":
        from ..runtime.verify import run_model

        (name,) = step.adapters
        wanted = _wanted(references[name], folder / "model.onnx", name)
        _, outs = run_model(folder / "model.onnx", inputs=dict(inputs), outputs=wanted)
        results[name] = [_figures(o, outs[o], references[name][o], atol, rtol) for o in wanted]
    elif step.kind == "injected":
        from ..runtime.session import LoraSession

        session = LoraSession(folder / "model.onnx", providers=["CPUExecutionProvider"])
        for name in step.adapters:
            wanted = _wanted(references[name], folder / "model.onnx", name, session.get_outputs())
            session.load_adapter(name, folder / f"{name}.onnx_adapter")
            feeds = {i.name: inputs[i.name] for i in session.get_inputs() if i.name in inputs}
            outs = session.run(wanted, feeds, adapter=name)
            results[name] = [_figures(o, a, references[name][o], atol, rtol) for o, a in zip(wanted, outs)]
    elif step.kind == "per-row":
        results = _verify_per_row(step, folder, inputs, references, atol, rtol)
    passed = all(f["passed"] for figs in results.values() for f in figs)
    return {"passed": passed, "atol": atol, "rtol": rtol, "adapters": results}


def _wanted(reference: Mapping[str, np.ndarray], model: Path, adapter: str, outputs=None) -> list[str]:
    """The reference's output names, checked against the model's outputs."""
    if outputs is None:
        import onnx

        names = [o.name for o in onnx.load_model(str(model), load_external_data=False).graph.output]
    else:
        names = [o.name for o in outputs]
    unknown = sorted(set(reference) - set(names))
    if unknown or not reference:
        what = f"names {unknown[0]!r}, not an output" if unknown else "holds no outputs"
        raise RecipeError(f"the reference for {adapter!r} {what} of the model (outputs: {', '.join(names)})")
    return [n for n in names if n in reference]


def _verify_per_row(step: Step, folder: Path, inputs, references, atol: float, rtol: float) -> dict[str, list[dict]]:
    """Plain ONNX Runtime on the per-row model with the whole pool fed: batch row r picks adapter
    ``r % n`` (pool entry ``r % n + 1``), so one run checks every adapter on its own rows against the
    rows of that adapter's reference outputs."""
    import onnxruntime as ort

    from ..formats.safetensors import read_safetensors

    pool, _ = read_safetensors(folder / "pool.safetensors")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    user = [i.name for i in session.get_inputs() if i.name in inputs]
    batch = int(np.asarray(inputs[user[0]]).shape[0])
    n = len(step.adapters)
    ids = np.array([r % n + 1 for r in range(batch)], np.int64)
    feeds = {**{k: inputs[k] for k in user}, **{k: np.asarray(v) for k, v in pool.items()}, "lora_adapter_ids": ids}
    first = step.adapters[0]
    wanted = _wanted(references[first], folder / "model.onnx", first, session.get_outputs())
    outs = dict(zip(wanted, session.run(wanted, feeds)))
    results = {}
    for i, name in enumerate(step.adapters):
        rows = [r for r in range(batch) if r % n == i]
        results[name] = (
            [_figures(o, outs[o][rows], np.asarray(references[name][o])[rows], atol, rtol) for o in wanted]
            if rows
            else []
        )
    return results

"""Fold a LoRA adapter into an ONNX model's weights: W' = W₀ + ΔW (DoRA: PEFT's merge formula).

``merge_adapter`` is a pure IR transform: the graph (nodes, op types, inputs, outputs) is unchanged and
only the resolved target initializers get new values, each rounded once into its stored dtype.
``merge_file`` is the I/O edge: validated load, merge, atomic save with the base's external-data layout.
Only touched tensors are ever read; onnx-ir keeps the rest memory-mapped and streams them to the output.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lora_export.core.adapter import Adapter, target_digest
from lora_export.errors import AdapterError, ConfigError, ModelError
from lora_export.files.atomic import refuse_overwrite
from lora_export.files.checks import require_regular_file

from ..model.model_io import check_outputs, external_data_files, load_model, save_model
from ..model.patch_save import save_patched, snapshot, start_copy
from ..model.provenance import append_history, extra_entry, make_record, target_entry
from ..model.slot_manifest import SLOTS_KEY, SlotManifest
from ..ops.consumers import free_name, other_readers, private_copy
from ..ops.float_convert import convert_lossy
from ..ops.layouts import store
from ..targets.genai_names import GenaiDims, read_genai_config
from ..targets.resolve import ResolvedTarget
from ..targets.vera_bind import bind_to_graph
from .base_check import check_base_weights, check_resolved
from .convert import weight_reader
from .history_guard import history_or_refusal, injected_repeat, merge_slot_digests, merged_repeat, refuse, safe_history
from .merge_plan import merged_value, plan_merge
from .merge_report import MergeReport

Progress = Callable[[int, int, str], None]  # (done, total, current target name)
_HINT = "use --force to merge anyway"


def merge_adapter(
    model: ir.Model,
    adapter: Adapter,
    *,
    base_weights: Mapping[str, np.ndarray] | None = None,
    scale: float = 1.0,
    allow_partial: bool = False,
    compute_dtype: np.dtype | type = np.float32,
    progress: Progress | None = None,
    force: bool = False,
    requantize: bool = False,
    into_float: bool = False,
    genai_dims: GenaiDims | None = None,
) -> MergeReport:
    """Fold ``adapter`` (times ``scale``) into ``model`` in place and report what was done.

    Every check that can fail before a weight changes runs first; an error while folding (NaN/Inf
    in a merged weight, grouped-conv LoRA) leaves ``model`` partly changed, so discard it then.
    Raises TargetError for unmatched targets unless ``allow_partial``, and always when nothing matches.

    The merge is appended to the model's ``lora_export.history`` (see ``provenance``). An adapter whose
    digest the history already records as merged is refused (its delta would be added twice) unless
    ``force``, and so is one sharing a target (same module, same tensors) with an earlier merge (a
    subset merged again with ``only_targets``); so is a model whose history is unreadable (with ``force``
    the history then restarts). Into an injected model, an adapter it has slots for is refused too (its slot
    file would apply it once more) unless ``force``, and the record keeps the digests of the slot tensors
    the adapter fills (``history_guard``), so that loading such a file into the result is refused.

    Quantized weights (plugin layouts with ``lossy_write``) can only take W₀ + ΔW by requantizing, which
    rounds the whole weight again: refused unless ``requantize`` (inject serves them exactly instead), or
    ``into_float``: their ops become float MatMuls on the dequantized weight + ΔW (exact; ``report.converted``).
    ``genai_dims``: the onnxruntime-genai config's attention widths (names-based packed slices).

    An adapter that carries a base fingerprint (files lora-export wrote) is refused, unless ``force``, when
    the weights it resolves to (or ``base_weights``) are not the ones it was made for (``base_check``).
    """
    if requantize and into_float:
        raise ConfigError("--requantize and --into-float exclude each other: pick one")
    if not np.isfinite(scale):
        raise AdapterError(f"scale must be finite, got {scale}")
    adapter = bind_to_graph(model, adapter, base_weights)  # VeRA: A′ needs each layer's input size
    digest = adapter.digest()
    target_digests = {t.name: target_digest(t) for t in adapter}
    repeat = _repeat(model, adapter, force)
    slots = None
    if SLOTS_KEY in model.metadata_props:
        # Into an injected model: record what this adapter's slot file holds, so loading it later is refused.
        manifest = SlotManifest.from_json(model.metadata_props[SLOTS_KEY])
        slots = merge_slot_digests(model, adapter, manifest, weight_reader(model))
    # --base-weights of another checkpoint: say so before resolving by their values finds nothing.
    check_base_weights(adapter, base_weights, force, _HINT)
    t0 = time.perf_counter()
    adapter, resolution = plan_merge(
        model,
        adapter,
        base_weights=base_weights,
        scale=scale,
        allow_partial=allow_partial,
        lossy_ok=requantize or into_float,
        genai_dims=genai_dims,
        bound=True,
    )
    report = MergeReport(adapter=adapter.name, resolution=resolution, scale=float(scale), adapter_sha256=digest)
    report.timings["resolve"] = time.perf_counter() - t0
    # The base checkpoint the adapter was made for (its fingerprint, when it has one): before any weight changes.
    history = safe_history(model)
    check_resolved(adapter, resolution.matched, history if isinstance(history, list) else [], force, _HINT)
    lossy = [r for r in resolution.matched if getattr(r.layout, "lossy_write", False)]
    if lossy and into_float:
        report.converted = convert_lossy(model, resolution.matched)

    t0 = time.perf_counter()
    matched = resolution.matched
    for i, r in enumerate(matched):
        if progress is not None:
            progress(i, len(matched), r.target.name)
        report.merged.append(_fold(model, r, compute_dtype))
    for e in resolution.extras:
        if e.status == "matched":
            report.replaced.append(_replace(model, e, np.asarray(adapter.extra[e.key])))
    if progress is not None:
        progress(len(matched), len(matched), "")
    report.timings["merge"] = time.perf_counter() - t0
    record = _record(report, digest, target_digests, forced=repeat is not None)
    if slots:
        record["slots"] = slots
    report.history = append_history(model, [record], replace_unreadable=force)
    report.repeated = repeat
    return report


def _repeat(model: ir.Model, adapter: Adapter, force: bool) -> str | None:
    """Why this merge repeats an earlier one (None if it does not); raised as an error unless ``force``.

    A history we cannot read (or a duplicated one) is refused too (unless ``force``): it might hold this
    adapter. So is an adapter the model has slots for (inject): its slot file would apply it once more.
    """
    history = history_or_refusal(safe_history(model), force, "use --force to merge anyway")
    why = merged_repeat(history, adapter)
    refuse(why, force, "use --force to merge anyway", "merging it again adds its delta twice")
    if why is None:
        why = injected_repeat(history, adapter) if SLOTS_KEY in model.metadata_props else None
        refuse(why, force, "use --force to merge anyway", "loading that file into the merged model is then refused")
    return why


def _record(report: MergeReport, digest: str, target_digests: dict[str, str], forced: bool) -> dict:
    """The history record of a finished merge: each target's and extra's status and written initializer."""
    written = {m["target"]: m["initializer"] for m in report.merged}
    replaced = {r["tensor"]: r["initializer"] for r in report.replaced}
    res = report.resolution
    targets = [
        target_entry(r.target.name, r.status, written.get(r.target.name), target_digests.get(r.target.name))
        for r in res.targets
    ]
    extras = [extra_entry(e.key, e.status, replaced.get(e.key)) for e in res.extras]
    return make_record(
        "merge", report.adapter, digest, scale=report.scale, targets=targets, extras=extras, forced=forced
    )


def _fold(model: ir.Model, r: ResolvedTarget, compute_dtype) -> dict:
    """Merge one target into its weight (read once, write once, even when its module is called twice).

    A weight other nodes also read (tied weights; equal tensors an exporter deduplicated) must keep its
    value for them: the target's own nodes get a private merged copy instead.
    """
    t = r.target
    stored_before = r.value.const_value
    shared = other_readers(r.value, r.nodes)
    original = r.value.name
    if shared:
        r.value = private_copy(model, r.value, r.nodes, f"{t.name}.weight")
    merged = merged_value(r, compute_dtype)
    r.layout.write(r.node, merged)
    del merged
    _unmap(stored_before)  # its memory-mapped pages are not needed again: keeps peak RSS low
    stored = r.value.const_value
    if stored.dtype.is_floating_point() and not np.isfinite(stored.numpy().astype(np.float32)).all():
        raise AdapterError(f"{t.name}: the merged weight overflows {stored.dtype.name} (Inf after rounding)")
    out = {
        "target": t.name,
        "initializer": r.value.name,
        "dtype": stored.dtype.name,
        "shape": [int(d) for d in stored.shape],
        "nodes": [n.name for n in r.nodes],
    }
    if shared:
        out["private_copy_of"] = original
        out["shared_with"] = shared
    # A layout that rounds lossily (requantization) may describe what the write cost.
    write_report = getattr(r.layout, "last_write_report", None)
    if write_report:
        out["write"] = dict(write_report)
        r.layout.last_write_report = None
    return out


def _unmap(tensor) -> None:
    """Unmap an external tensor once read: its pages would otherwise stay in the process's resident
    memory (as much as every merged weight again). It maps itself again if anything reads it later."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            pass  # an array still views the mapping: it stays mapped


def _replace(model: ir.Model, e, arr: np.ndarray) -> dict:
    """Write a full replacement tensor; into a private copy when other modules read the same tensor."""
    out = {"tensor": e.key, "initializer": e.value.name, "shape": list(e.shape)}
    if e.layout is not None:
        if e.private:
            private_copy(model, e.value, e.nodes, e.key)
        e.layout.write(e.node, arr)
    elif e.private:
        # The module's readers get their own initializer; the shared one (and its Identity copies) stays.
        dtype = e.source.const_value.dtype
        new = ir.Value(name=free_name(model, e.key), type=e.source.type, shape=e.source.shape)
        new.const_value = ir.tensor(np.ascontiguousarray(arr).astype(dtype.numpy()), dtype=dtype, name=new.name)
        (e.source.graph or model.graph).register_initializer(new)
        for node in e.nodes:
            for i, inp in enumerate(node.inputs):
                if inp is e.value:
                    node.replace_input_with(i, new)
        out["initializer"], out["private_copy_of"] = new.name, e.value.name
    else:
        store(e.value, arr)
    return out


def merge_file(
    base_path: str | os.PathLike,
    adapter_or_path: Adapter | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    base_weights: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    scale: float = 1.0,
    allow_partial: bool = False,
    compute_dtype: np.dtype | type = np.float32,
    progress: Progress | None = None,
    external: bool | None = None,
    only_targets: str | None = None,
    force: bool = False,
    requantize: bool = False,
    into_float: bool = False,
) -> MergeReport:
    """Merge an adapter (object, or PEFT adapter directory) into the ONNX model at ``base_path``.

    Writes ``out_path`` (and ``<out>.<content hash>.data`` when the base used external data) as one
    unit: on any error nothing appears there, and a kill leaves the previous output or the new one. The
    inputs are only read. ``base_weights`` (a mapping or a .safetensors path) enables matching weights
    by value. ``only_targets`` (a regex searched in each target's path) merges part of the adapter,
    e.g. its encoder targets into an encoder exported alone.
    ``force`` merges an adapter the model's history records as merged already (see ``merge_adapter``).
    """
    from lora_export.formats.peft import adapter_files, load_adapter
    from lora_export.formats.safetensors import read_safetensors

    t_start = time.perf_counter()
    if requantize and into_float:
        raise ConfigError("--requantize and --into-float exclude each other: pick one")
    check_outputs(out_path)  # a folder or a device as output: refuse before any work
    base_path, out_path = Path(base_path), Path(out_path)
    adapter = adapter_or_path if isinstance(adapter_or_path, Adapter) else load_adapter(adapter_or_path)
    adapter = adapter.select(only_targets)
    base_weights_path = None
    if base_weights is not None and not isinstance(base_weights, Mapping):
        base_weights_path = require_regular_file(base_weights, "base weights", AdapterError)
        base_weights = read_safetensors(base_weights)[0]
    # The adapter's and base weights' files are inputs too: the output must not replace them.
    other_inputs = [] if isinstance(adapter_or_path, Adapter) else adapter_files(adapter_or_path)
    if base_weights_path is not None:
        other_inputs.append(Path(base_weights_path))
    _refuse_overwrite(base_path, out_path, other_inputs=other_inputs)
    t0 = time.perf_counter()
    model = load_model(base_path)
    base_data = external_data_files(model, base_path)
    _refuse_overwrite(base_path, out_path, base_data)
    before = snapshot(model)
    t_load = time.perf_counter() - t0
    with ExitStack() as stack:
        # The base's data file is copied for the output while the merge is computed (patch_save).
        early = start_copy(stack, base_path, out_path, before) if external is not False else None
        report = merge_adapter(
            model,
            adapter,
            base_weights=base_weights,
            scale=scale,
            allow_partial=allow_partial,
            compute_dtype=compute_dtype,
            progress=progress,
            force=force,
            requantize=requantize,
            into_float=into_float,
            genai_dims=read_genai_config(base_path),
        )
        t0 = time.perf_counter()
        written = None
        if external is not False and before:
            written = save_patched(model, base_path, out_path, before, keep=base_data, early=early)
        if written is None:
            written = save_model(model, out_path, external=external, keep=base_data)
    report.timings = {"load": t_load, **report.timings, "save": time.perf_counter() - t0}
    report.timings["total"] = time.perf_counter() - t_start
    report.base, report.output = str(base_path), str(out_path)
    report.files = [str(p) for p in written]
    return report


def _refuse_overwrite(
    base: Path, out: Path, data_files: set[Path] = frozenset(), other_inputs: Sequence[Path] = ()
) -> None:
    """Refuse an output that would overwrite the base model, any file it reads, or another input file."""
    out_r = out.resolve()
    out_data = out_r.parent / f"{out_r.name}.data"
    inputs = {base.resolve(), *data_files}
    for p in (out_r, out_data):
        if p in inputs or (p.exists() and any(p.samefile(i) for i in inputs if i.exists())):
            raise ModelError(f"refusing to write {out}: it would overwrite the input {p.name}")
    refuse_overwrite([out_r, out_data], other_inputs)

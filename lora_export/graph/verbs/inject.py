"""Adapter mode: give every targeted weight a swappable LoRA side branch fed by graph inputs.

``inject_adapters`` rewrites an ONNX model in memory: each module targeted by any of the given
adapters gets y = op(x) + (x·A′)·B′ (DoRA: y = g ⊙ (op(x) + (x·A′)·B′) + bias), with A′, B′ and g as
optional graph inputs whose defaults (rank 0, g = 1) reproduce the base model. ``inject_files`` writes
the model and, per adapter, the tensors that fill its slots as ``.onnx_adapter`` and ``.safetensors``.
See ``slots`` for input names and layouts.

ONNX Runtime runs the rank-0 defaults as they are: MatMul, Gather and Conv (grouped too) all accept a
zero-sized rank dimension (tested: the injected model without an adapter equals the base model). The
files also work with plain ONNX Runtime: ``ort.LoraAdapter().Load(path)`` and
``RunOptions.add_active_adapter``, since the adapter parameter names are the model's input names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lora_export.core.adapter import Adapter, target_digest
from lora_export.core.vera import projection_entry
from lora_export.errors import AdapterError, ModelError, TargetError, some
from lora_export.files.atomic import refuse_overwrite
from lora_export.files.checks import require_regular_file
from lora_export.files.inject_folder import (
    FILES_MANIFEST,
    check_adapter_name,
    read_files_manifest,
    refuse_blocked_outputs,
    write_files_manifest,
)
from lora_export.files.publish import publish_folder, stage_parent
from lora_export.files.staging import staging_dir
from lora_export.formats.adapter_files import write_adapter_tensors
from lora_export.formats.peft import adapter_files, load_adapter
from lora_export.formats.safetensors import read_safetensors, write_safetensors

from ..match.value_match import quantized_holds
from ..model.genai_folder import genai_file_names, genai_side_files, write_genai_side_files
from ..model.model_io import external_data_files, load_model, save_model
from ..model.patch_save import save_patched, snapshot, start_copy
from ..model.provenance import DUPLICATES_META, HistoryError, append_history, make_record, target_entry
from ..model.slot_manifest import SLOTS_KEY, Slot, SlotManifest
from ..ops.layouts import get_layout
from ..ops.packed import PackedSlice
from ..ops.packed_branch import add_packed_branch
from ..slots.packed_cat import cat_plan
from ..slots.per_row import POOL_FILE, make_per_row, pool_metadata, pool_tensors
from ..slots.tensors import adapter_tensors, slot_stems
from ..slots.vera import branch_factors, common_projection, projection_values, vera_slot_fields
from ..targets.genai_names import GenaiDims, read_genai_config
from ..targets.vera_bind import bind_to_graph
from .base_check import check_base_weights, check_resolved, slot_file_entries
from .convert import weight_reader
from .history_guard import history_or_refusal, merged_repeat, refuse, safe_history
from .inject_resolve import resolve_all

MODEL_NAME = "model.onnx"


@dataclass
class InjectResult:
    """The slots added, the tensors for each adapter (by adapter name), and per-adapter resolution reports."""

    manifest: SlotManifest
    tensors: dict[str, dict[str, np.ndarray]]
    reports: dict[str, list[dict]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)  # adapter name → adapter_digest
    history: list[dict] = field(default_factory=list)  # the model's lora_export.history after the inject
    fingerprints: dict[str, dict] = field(default_factory=dict)  # adapter name → its slot files' base fingerprint

    def to_dict(self) -> dict:
        return {
            "slots": [
                {"module": s.module, "op": s.op, "kind": s.kind, "inputs": s.inputs, "dtype": s.dtype}
                for _, s in sorted(self.manifest.slots.items())
            ],
            "absent": self.manifest.absent,
            "adapters": {
                name: {"tensors": len(t), "sha256": self.digests.get(name), "resolution": self.reports.get(name, [])}
                for name, t in self.tensors.items()
            },
            "history": self.history,
            "files": [str(p) for p in self.files],
        }


def _slot_input(graph: ir.Graph, name: str, dtype: ir.DataType, shape: list, default: np.ndarray) -> ir.Value:
    # The declared shape keeps the rank symbolic; the default tensor is the rank-0 instance of it.
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
    value.const_value = ir.tensor(default, dtype=dtype, name=name)
    graph.inputs.append(value)
    graph.register_initializer(value)
    return value


def inject_adapters(
    model: ir.Model,
    adapters: Sequence[Adapter],
    *,
    base_weights: Mapping[str, np.ndarray] | None = None,
    dora: bool = False,
    genai_dims: GenaiDims | None = None,
    force: bool = False,
    packed_cat: bool = True,
) -> InjectResult:
    """Add LoRA slots for the union of the adapters' targets to ``model`` (in place).

    A slot gets a DoRA scale input when one of the adapters is DoRA there, or for every slot with
    ``dora=True`` (so DoRA adapters converted later fit; it defaults to ones, a no-op otherwise).
    When every adapter is VeRA over the same projections (and not ``dora``), the slots are VeRA's
    vector-only slots (``slots/vera``); VeRA adapters with other company get the usual LoRA slots.
    Returns the slot manifest (also stored in ``model.metadata_props``) and each adapter's slot tensors.
    ``genai_dims``: the onnxruntime-genai config's attention widths (names-based packed slices).
    Each adapter gets an ``inject`` record in the model's ``lora_export.history`` (see ``provenance``); an
    unreadable history is kept under ``lora_export.history.unreadable`` and restarted. An adapter the
    history records as merged already (its slot file would apply it twice), or a duplicated history, is
    refused unless ``force``; so is an adapter whose base fingerprint (``base_check``) does not match the
    weights it resolves to or ``base_weights``. Each adapter's slot files get the fingerprint of this
    model's weights under their slots (``result.fingerprints``). ``packed_cat``: the slots of a packed op read
    one concatenated A_cat/B_cat pair (``slots.packed_cat``; False: a pair per slot, the form of older models).
    """
    if not adapters:
        raise AdapterError("inject needs at least one adapter")
    names = [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AdapterError(f"two adapters share the name {dupes[0]!r}; adapter files are named after them")
    if SLOTS_KEY in model.metadata_props:
        raise AdapterError("model already has LoRA slots; inject into the base model (or use convert)")
    history = safe_history(model)
    if isinstance(history, HistoryError) and DUPLICATES_META in model.meta:
        history = history_or_refusal(history, force, "use --force to inject anyway")
    for adapter in adapters:
        why = merged_repeat(history, adapter) if isinstance(history, list) else None
        refuse(why, force, "use --force to inject anyway", "its slot file would apply it a second time")
    for adapter in adapters:
        adapter.check_finite()
        if adapter.extra:
            raise AdapterError(
                f"adapter {adapter.name!r} replaces full tensors ({some(sorted(adapter.extra))}), "
                "which adapter mode cannot swap; use merge"
            )
    adapters = [bind_to_graph(model, a, base_weights) for a in adapters]
    shared = None if dora else common_projection(adapters)
    hint = "use --force to inject anyway"
    for adapter in adapters:  # before resolving by the values of --base-weights finds nothing
        check_base_weights(adapter, base_weights, force, hint)
    chosen, reports, absent = resolve_all(model, adapters, base_weights, genai_dims)
    for adapter in adapters:
        mine = [chosen[t.name] for t in adapter if t.name in chosen]
        check_resolved(adapter, mine, history if isinstance(history, list) else [], force, hint)
    dora_modules = set(chosen) if dora else {t.name for a in adapters for t in a if t.is_dora}
    stems = slot_stems(sorted(chosen), adapters)
    slots: dict[str, Slot] = {}
    for module in sorted(chosen):
        rt = chosen[module]
        t = rt.target
        groups = 1
        if t.kind == "conv":
            attr = rt.node.attributes.get("group")
            groups = attr.as_int() if attr is not None else 1
        slots[module] = Slot(
            module=module,
            kind=t.kind,
            op=rt.node.op_type,
            node=rt.node.name,
            weight=rt.value.name,
            weight_shape=list(t.weight_shape),
            dtype=str(rt.layout.activation_dtype(rt.node).numpy()),
            a=f"{stems[module]}.lora_A",
            b=f"{stems[module]}.lora_B",
            dora=f"{module}.dora_scale" if module in dora_modules else None,
            groups=groups,
        )
        if shared is not None:
            slots[module] = dataclasses.replace(slots[module], **vera_slot_fields(module))
    if packed_cat and shared is None:
        for module, fields in cat_plan(chosen, stems, dora_modules).items():
            slots[module] = dataclasses.replace(slots[module], **fields)
    manifest = SlotManifest(slots, sorted(absent), projection_entry(shared) if shared is not None else None)

    # Tensors first: DoRA's g reads the base weights, which the graph edits below leave untouched anyway.
    def read_weight(slot: Slot) -> np.ndarray:
        rt = chosen[slot.module]
        return rt.layout.read(rt.node)

    def holds(slot: Slot, w: np.ndarray) -> bool:
        rt = chosen[slot.module]
        return quantized_holds(rt.layout, rt.node, w)

    read_weight.holds = holds  # type: ignore[attr-defined]

    tensors = {a.name: adapter_tensors(a, manifest, read_weight) for a in adapters}
    # Each slot file says which base weights it was made for: this model's, as they are, read back the way
    # convert and LoraSession read them (by the slot's node).
    entries = slot_file_entries(manifest, weight_reader(model), {t.name for a in adapters for t in a})
    fingerprints = {a.name: {t.name: entries[t.name] for t in a if t.name in entries} for a in adapters}

    graph = model.graph
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    clash = sorted({n for s in slots.values() for n in s.inputs} & taken)
    if clash:
        raise ModelError(f"the model already has a value named {clash[0]!r}, which a LoRA slot input needs")
    made: dict[str, ir.Value] = {}  # a shared group's inputs are made once, for its first module
    packed: dict[int, tuple[ir.Node, list]] = {}  # packed op → its slots, given one branch together
    cat_done: set[str] = set()  # A_cat inputs whose packed op has its branch
    for module, slot in sorted(slots.items()):
        rt = chosen[module]
        dtype = rt.layout.activation_dtype(rt.node)
        np_dtype = slot.np_dtype
        if slot.a not in made:
            a_shape, b_shape = slot.a_shape(slot.rank_dim), slot.b_shape(slot.rank_dim)
            made[slot.a] = _slot_input(graph, slot.a, dtype, a_shape, np.zeros(slot.a_shape(0), np_dtype))
            made[slot.b] = _slot_input(graph, slot.b, dtype, b_shape, np.zeros(slot.b_shape(0), np_dtype))
        a, b = made[slot.a], made[slot.b]
        if slot.vera:  # λ_d, λ_b → the branch's A′, B′ (λ_b defaults to 0 and λ_d to rank 0: the base)
            out_f, in_f = slot.weight_shape
            a, b = branch_factors(graph, module, in_f, out_f, a, b, projection_values(graph, shared, dtype))
        g = None
        if slot.dora:
            g = _slot_input(graph, slot.dora, dtype, [slot.out_features], np.ones(slot.out_features, np_dtype))
        if not rt.nodes:
            raise TargetError(f"{module}: no node applies its weight")
        for node in rt.nodes:
            if slot.packed is not None:  # the op's own branch over A_cat/B_cat, once for all its slots
                if slot.a not in cat_done:
                    cat_done.add(slot.a)
                    rt.layout.inner.add_branch(graph, node, a, b, None)
                continue
            if isinstance(rt.layout, PackedSlice):
                packed.setdefault(id(node), (node, []))[1].append((rt.layout, a, b, g))
                continue
            layout = rt.layout if getattr(rt.layout, "per_target", False) else get_layout(node)
            layout.add_branch(graph, node, a, b, g)
    for node, parts in packed.values():
        add_packed_branch(graph, node, parts)
    model.metadata_props[SLOTS_KEY] = manifest.to_json()
    digests = {a.name: a.digest() for a in adapters}
    records = []
    for a in adapters:
        sha = {t.name: target_digest(t) for t in a}
        rows = reports[a.name]
        entries = [target_entry(r["target"], r["status"], r["initializer"], sha.get(r["target"])) for r in rows]
        records.append(make_record("inject", a.name, digests[a.name], targets=entries))
    history = append_history(model, records, replace_unreadable=True)
    return InjectResult(manifest, tensors, reports, digests=digests, history=history, fingerprints=fingerprints)


def inject_files(
    base_path: str | os.PathLike,
    adapter_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    base_weights: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    dora: bool = False,
    only_targets: str | None = None,
    names: Sequence[str | None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    force: bool = False,
    per_row: bool = False,
    packed_cat: bool = True,
) -> InjectResult:
    """``lora-export inject``: OUTDIR/model.onnx (+ external data when the base had it) and, per adapter,
    OUTDIR/<name>.onnx_adapter and OUTDIR/<name>.safetensors (<name>: ``names[i]`` where given, else the
    adapter directory's name).

    The whole folder is built beside OUTDIR (files of an existing OUTDIR that this run does not write
    are linked in) and swapped in as one directory entry: a crash leaves the old folder or the new one.
    A base in an onnxruntime-genai folder (``genai_config.json`` naming it) brings that folder's other files
    along, the config pointing at OUTDIR/model.onnx (``genai_folder``). OUTDIR/.lora-export.json lists the
    files written; a later inject into the same folder removes those
    of them it no longer writes (an adapter dropped or renamed), and never any other file.
    ``progress(done, total, file name)`` is called as the files are written. ``force``: see ``inject_adapters``.
    ``per_row``: slots that hold a pool of adapters and a ``lora_adapter_ids`` input picking each row's
    (``per_row``); OUTDIR/pool.safetensors then holds the pool of these adapters (entry i+1: the i-th).
    ``packed_cat``: see ``inject_adapters``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AdapterError(f"{out_dir} exists and is not a directory")
    if names is not None and len(names) != len(adapter_paths):
        raise AdapterError(f"{len(names)} name(s) for {len(adapter_paths)} adapter(s)")
    names = list(names) if names is not None else [None] * len(adapter_paths)
    for n in names:
        if n is not None:
            check_adapter_name(n)
    adapters = [load_adapter(p, name=n).select(only_targets) for p, n in zip(adapter_paths, names)]
    for a, p, n in zip(adapters, adapter_paths, names):
        if n is None:
            check_adapter_name(a.name, f" (from the folder {str(p)!r}; name it with NAME=PATH)")
    outputs = [out_dir / MODEL_NAME, out_dir / f"{MODEL_NAME}.data", out_dir / FILES_MANIFEST]
    outputs += [out_dir / f"{a.name}{suffix}" for a in adapters for suffix in (".onnx_adapter", ".safetensors")]
    if per_row:
        outputs.append(out_dir / POOL_FILE)
    refuse_blocked_outputs(outputs)
    inputs = [Path(base_path), *(f for p in adapter_paths for f in adapter_files(p))]
    if base_weights is not None and not isinstance(base_weights, Mapping):
        require_regular_file(base_weights, "base weights", AdapterError)
        inputs.append(Path(base_weights))
        base_weights = read_safetensors(base_weights)[0]
    model = load_model(base_path)
    # OUTDIR may be the base model's own folder: the new model.onnx (or its data) must not replace an input.
    base_data = external_data_files(model, base_path)
    refuse_overwrite(outputs, [*inputs, *base_data], ModelError)
    # An onnxruntime-genai folder: its genai_config.json and tokenizer files go along (see genai_folder).
    genai = genai_side_files(base_path, {p.name for p in outputs} | {p.name for p in base_data}, base_data)
    if genai is not None and Path(os.path.realpath(out_dir)) == Path(base_path).resolve().parent:
        raise ModelError(f"{out_dir} is the base model's onnxruntime-genai folder: inject into another folder")
    if genai is not None:  # outputs too: never a folder or special file of OUTDIR replaced by them
        refuse_blocked_outputs([out_dir / name for name in genai_file_names(genai)])
    genai_dims = read_genai_config(base_path)
    before = snapshot(model)
    # Through a symlinked OUTDIR, replace the folder it points to, not the link.
    dest = Path(os.path.realpath(out_dir)) if out_dir.is_symlink() else out_dir
    with staging_dir(stage_parent(dest)) as stage:
        new = stage / "out"
        os.mkdir(new, 0o777)
        with ExitStack() as copying:
            # The weights are the base's, unchanged: its data file is copied in the kernel while the slots
            # are made (see patch_save).
            early = start_copy(copying, base_path, new / MODEL_NAME, before)
            result = inject_adapters(
                model,
                adapters,
                base_weights=base_weights,
                dora=dora,
                genai_dims=genai_dims,
                force=force,
                packed_cat=packed_cat,
            )
            pool = None
            if per_row:
                make_per_row(model, result.manifest)
                order = [a.name for a in adapters]
                pool = (pool_tensors(result.manifest, [result.tensors[n] for n in order]), pool_metadata(order))
            total = 1 + 2 * len(result.tensors)
            if progress is not None:
                progress(0, total, MODEL_NAME)
            model_files = save_patched(model, base_path, new / MODEL_NAME, before, early=early) if before else None
        model_files = model_files or save_model(model, new / MODEL_NAME)
        if genai is not None:
            write_genai_side_files(genai, new, MODEL_NAME)
        done = 1
        for name, tensors in sorted(result.tensors.items()):
            for suffix in (".onnx_adapter", ".safetensors"):
                if progress is not None:
                    progress(done, total, f"{name}{suffix}")
                write_adapter_tensors(
                    new / f"{name}{suffix}",
                    tensors,
                    model_version=result.manifest.fingerprint,
                    fingerprint=result.fingerprints.get(name),
                )
                done += 1
        if pool is not None:
            write_safetensors(new / POOL_FILE, pool[0], metadata=pool[1])
        produced = sorted(p.name for p in new.iterdir())
        write_files_manifest(new / FILES_MANIFEST, produced)
        if progress is not None:
            progress(total, total, "")
        # Files this run does not write (adapters converted later, the user's own) stay in the folder;
        # those an earlier inject wrote and this one does not (stale adapters, old data) are left behind.
        stale = set(read_files_manifest(dest / FILES_MANIFEST)) - set(produced) if dest.is_dir() else set()
        replaced = {p.name for p in outputs} | set(produced)
        data = [p.name for p in model_files[:-1]]
        publish_folder(new, dest, stage, replaced=replaced, stale=stale, main=(MODEL_NAME, data), last=FILES_MANIFEST)
    result.files = [out_dir / f for f in produced]
    return result

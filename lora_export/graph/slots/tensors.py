"""LoRA slots of an injected model: the adapter tensors that fill them (the manifest: ``model/slot_manifest``).

Every injected module gets graph inputs named after its module path (ONNX Runtime's multi-LoRA
convention: input names are the adapter parameter names):

  ``<module>.lora_A``      A′, linear/embedding (in, r), conv (r, in, *k)
  ``<module>.lora_B``      B′ = scale·B, linear/embedding (r, out), conv (out, r/groups, 1...)
  ``<module>.dora_scale``  g = m/‖W₀+ΔW‖ (out,), only for slots a DoRA adapter targets

VeRA's vector-only slots take ``<module>.vera_lambda_d`` (r) and ``<module>.vera_lambda_b`` (out) instead of
A′/B′ (``slots/vera``); the manifest's ``vera`` entry names the shared projections they need.

``r`` is the symbolic dimension ``<module>.rank``; the defaults are rank 0 (and g = 1), which is the
base model. Modules whose adapters share one LoRA (``Adapter.shared``, LoRA-drop) share one pair of
inputs named after the group, ``<group>.lora_A`` / ``<group>.lora_B`` (rank ``<group>.rank``): several
slots then read the same two inputs, and an adapter file holds them once. The plain slots of one packed op
(q/k/v of a fused ``qkv_proj``) read one concatenated pair, ``<group>.lora_A`` (in, Σr) and the block-diagonal
``<group>.lora_B`` (Σr, total) (``packed_cat``; the manifest's ``packed`` entries). The manifest
(``metadata_props["lora_export.slots"]``, JSON) lets ``convert`` and the runtime map a later adapter
onto the slots without resolving the graph again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from lora_export.core.adapter import Adapter, LoraTarget
from lora_export.core.delta import dora_scale
from lora_export.errors import AdapterError, DtypeError, ModelError, ShapeError, TargetError, some

from ..match.value_match import check_stored_weight
from ..model.slot_manifest import Slot, SlotManifest, floating_dtype
from .packed_cat import cat_tensors, module_view
from .vera import bind_to_slots, vector_tensors


def slot_tensors(slot: Slot, t: LoraTarget, w0: Callable[[], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A′, B′ (scale folded in, in float32, then cast once) and DoRA's g for one target in ``slot``.

    ``w0`` returns the base weight in canonical layout; only DoRA targets call it.
    """
    misfit = slot_misfit(slot, t)
    if misfit:
        raise ShapeError(f"{t.name}: {misfit}")
    if not floating_dtype(slot):
        # An integer slot would truncate A′ and B′ (exit 0, wrong outputs); strings cannot hold them at all.
        raise ModelError(f"{t.name}: the base weight has dtype {slot.dtype}; LoRA slots need a floating-point weight")
    a = np.asarray(t.A, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below, in one line
        b = np.asarray(t.B, dtype=np.float32) * np.float32(t.scale)
    if t.kind == "conv":
        a_p, b_p = a, b
    else:
        # linear B (out, r) and embedding B (dim, r) both become (r, out); A (r, in|num) becomes (in|num, r).
        a_p, b_p = a.T, b.T
    dt = slot.np_dtype
    with np.errstate(over="ignore", invalid="ignore"):
        out = {slot.a: np.ascontiguousarray(a_p).astype(dt), slot.b: np.ascontiguousarray(b_p).astype(dt)}
        if t.is_dora:
            if w0 is None:
                raise ShapeError(f"{t.name}: DoRA needs the base weight")
            g = dora_scale(w0(), t.delta(np.float32), t.magnitude, t.kind)
            out[slot.dora] = np.ascontiguousarray(g).astype(dt)
    # Scaling and the cast into the slot dtype can overflow what the inputs held; a slot full of Inf or
    # NaN would make every output NaN at run time, silently.
    check_finite_tensors(out, f"{t.name}: LoRA tensors scaled and cast to {slot.dtype}")
    return out


def check_finite_tensors(tensors: Mapping[str, np.ndarray], what: str) -> None:
    """Refuse slot tensors holding NaN or Inf (one line naming the first such tensor)."""
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if str(arr.dtype) == "bfloat16":
            arr = arr.astype(np.float32)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise AdapterError(f"{what}: {name} contains NaN or Inf")


def slot_misfit(slot: Slot, t: LoraTarget) -> str | None:
    """Why ``t`` does not fit ``slot``, or None."""
    if t.kind != slot.kind:
        return f"{t.kind} adapter for a {slot.kind} slot"
    if list(t.weight_shape) != list(slot.weight_shape):
        return f"adapter expects a weight of shape {tuple(t.weight_shape)}, slot has {tuple(slot.weight_shape)}"
    if t.kind == "conv" and t.groups != slot.groups:
        return f"adapter's lora_B has groups={t.groups}, slot has groups={slot.groups}"
    if t.is_dora and not slot.dora:
        return "DoRA adapter but the slot has no dora_scale input (inject with --dora to reserve one)"
    return None


def adapter_tensors(
    adapter: Adapter, manifest: SlotManifest, read_weight: Callable[[Slot], np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Every slot tensor for ``adapter``; refuses, naming all misfits, targets without a slot or shapes
    that do not fit. Modules recorded as absent from the graph are skipped (they change no output)."""
    if adapter.extra:
        raise AdapterError(
            f"adapter {adapter.name!r}: full replacement tensors ({some(sorted(adapter.extra))}) "
            "cannot be swapped at run time; use merge"
        )
    if manifest.vera is not None:
        return vector_tensors(adapter, manifest, check_finite_tensors)
    adapter = bind_to_slots(adapter, manifest.slots)
    missing = [t.name for t in adapter if t.name not in manifest.slots and t.name not in manifest.absent]
    if missing:
        raise TargetError(f"adapter {adapter.name!r}: targets with no LoRA slot in the model: {', '.join(missing)}")
    misfits = [
        f"{t.name} ({m})" for t in adapter if t.name in manifest.slots and (m := slot_misfit(manifest.slots[t.name], t))
    ]
    if misfits:
        raise ShapeError(f"adapter {adapter.name!r} does not fit the model's slots: {'; '.join(misfits)}")
    _check_shared_cover(adapter, manifest)
    tensors: dict[str, np.ndarray] = {}
    writer: dict[str, str] = {}
    packed: dict[str, dict[str, np.ndarray]] = {}  # module → its own A′/B′, placed in its group's A_cat/B_cat
    for t in adapter:
        slot = manifest.slots.get(t.name)
        if slot is None:
            continue
        stored = adapter.stored_base.get(t.name)
        quantized_ok = getattr(read_weight, "holds", None)
        if stored is not None and read_weight is not None and not (quantized_ok and quantized_ok(slot, stored)):
            check_stored_weight(adapter.name, t, stored, read_weight(slot), slot.np_dtype)
        w0 = (lambda s=slot: read_weight(s)) if read_weight is not None else None
        if slot.packed is not None:
            packed[t.name] = slot_tensors(module_view(slot), t, w0)
            continue
        for name, arr in slot_tensors(slot, t, w0).items():
            # A shared input is written once; every module reading it must bring the same tensor.
            if name in tensors and not np.array_equal(tensors[name], arr):
                raise ShapeError(
                    f"adapter {adapter.name!r}: {writer[name]} and {t.name} share one LoRA slot in this model "
                    f"({name}) but the adapter gives them different LoRA; inject this adapter into the base model"
                )
            tensors.setdefault(name, arr)
            writer.setdefault(name, t.name)
    tensors.update(cat_tensors(manifest, packed))
    return tensors


def _check_shared_cover(adapter: Adapter, manifest: SlotManifest) -> None:
    """An adapter filling a shared input fills it for every module that reads it: all must be its targets."""
    for name, readers in sorted(manifest.sharing().items()):
        covered = [m for m in readers if m in adapter.targets]
        if covered and len(covered) != len(readers):
            left = [m for m in readers if m not in adapter.targets]
            raise TargetError(
                f"adapter {adapter.name!r}: the model's LoRA slot {name} serves {len(readers)} modules together, "
                f"but the adapter targets {covered[0]} and not {left[0]}; inject this adapter into the base model"
            )


def check_tensors(tensors: Mapping[str, np.ndarray], manifest: SlotManifest, what: str) -> None:
    """Refuse tensors whose names, dtypes or shapes do not fit the slots (one line naming the misfits)."""
    by_input = manifest.input_names()
    unknown = sorted(k for k in tensors if k not in by_input)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise TargetError(
            f"{what}: tensors that are not LoRA inputs of this model (adapter for another model?): {shown}"
        )
    problems = []
    wrong_dtype = False
    for slot in sorted({id(s): s for s in (by_input[k] for k in tensors)}.values(), key=lambda s: s.module):
        a, b = tensors.get(slot.a), tensors.get(slot.b)
        if (a is None) != (b is None):
            problems.append(f"{slot.module} needs both lora_A and lora_B")
            continue
        if a is None:
            continue
        r = int(a.shape[0] if slot.kind == "conv" else a.shape[-1]) if a.ndim else -1
        if slot.vera and r != manifest.vera["r"]:
            problems.append(f"{slot.a} has rank {r}, the model's VeRA projections have r={manifest.vera['r']}")
            continue
        want = {slot.a: slot.a_shape(r), slot.b: slot.b_shape(r)}
        if slot.dora:
            want[slot.dora] = [slot.out_features]
        for name, shape in want.items():
            arr = tensors.get(name)
            if arr is None:
                continue
            if arr.dtype != slot.np_dtype:
                problems.append(f"{name} has dtype {arr.dtype}, model expects {slot.dtype}")
                wrong_dtype = True
            elif list(arr.shape) != list(shape):
                problems.append(f"{name} has shape {tuple(arr.shape)}, model expects {tuple(shape)}")
    if problems:
        # DtypeError is a ShapeError: callers that catch misfits in general still catch it.
        raise (DtypeError if wrong_dtype else ShapeError)(f"{what} does not fit the model: {'; '.join(problems)}")


def slot_stems(modules: Sequence[str], adapters: Sequence[Adapter]) -> dict[str, str]:
    """Each module's slot-input stem: its own path, or the name of a shared group (``Adapter.shared``).

    Modules share inputs only where every adapter agrees: each adapter either targets none of them or
    holds them in one shared group. A module some adapter gives its own LoRA keeps its own inputs.
    """
    keys: dict[str, tuple] = {}
    for m in modules:
        key = tuple((a.shared_group(m) or "") if m in a.targets else None for a in adapters)
        keys[m] = key if "" not in key and any(key) else (m,)
    members: dict[tuple, list[str]] = {}
    for m in modules:
        members.setdefault(keys[m], []).append(m)
    stems = {m: m for m in modules}
    used = set(modules)
    for key, ms in members.items():
        if len(ms) < 2 or key == (ms[0],):
            continue
        base = next(g for g in key if g)
        stem, i = base, 0
        while stem in used:  # a group name equal to a module path, or two groupings named alike
            i += 1
            stem = f"{base}.{i}"
        used.add(stem)
        stems.update({m: stem for m in ms})
    return stems

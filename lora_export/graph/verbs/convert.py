"""``convert``: turn a (later) adapter into slot tensors for an already-injected model.

The injected model's slot manifest says which inputs exist, their layouts and dtype; the adapter's
targets are mapped by module path. Misfits are refused, all named in one line. An adapter may cover a
subset of the slots: the others keep their rank-0 defaults. Models with LoRA inputs made by other tools
(Olive, onnxruntime-genai) have no manifest: their slots are read from the graph (``slots/foreign``; int4
LoRA inputs fed to MatMulNBits: ``foreign_quant``, lossy, so only with ``requantize``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lora_export.core.adapter import Adapter
from lora_export.errors import AdapterError, ConfigError, ModelError, TargetError
from lora_export.files.atomic import refuse_overwrite
from lora_export.files.checks import check_output_file, require_regular_file
from lora_export.formats.adapter_files import ADAPTER_SUFFIXES, write_adapter_tensors
from lora_export.formats.peft import adapter_files, load_adapter

from ..match.value_match import quantized_holds
from ..model.external_data import drop_mapped_pages
from ..model.model_io import check_external_data, load_model, note_duplicates
from ..model.slot_manifest import SLOTS_KEY, Slot, SlotManifest
from ..ops.layouts import get_layout
from ..slots.foreign import foreign_tensors, lora_input_names, slots_fingerprint
from ..slots.foreign_quant import QuantWriter, read_model_slots
from ..slots.tensors import adapter_tensors
from .base_check import mismatch, refuse_mismatch, slot_file_entries, slot_weights, stored_info
from .history_guard import history_or_refusal, merged_repeat, refuse, safe_history, slot_digests, slots_repeat


def _metadata(model_path: str | os.PathLike) -> dict[str, str]:
    return dict(_header(model_path).metadata_props)


def _header(model_path: str | os.PathLike) -> ir.Model:
    """The model without its external data (nothing is read from it), checked like every model we read."""
    import onnx

    require_regular_file(model_path, "model", ModelError)
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{model_path}: not a readable ONNX model ({type(e).__name__})") from None
    # No weights are read here, but a model whose data ONNX Runtime would refuse is refused by every reader.
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{model_path}: not a readable ONNX model ({type(e).__name__})") from None
    check_external_data(model, model_path)
    note_duplicates(model, proto, model_path)
    return model


def read_manifest(model_path: str | os.PathLike) -> SlotManifest:
    """The slot manifest of an injected model (metadata only; weights are not read)."""
    return SlotManifest.from_json(_metadata(model_path).get(SLOTS_KEY))


def weight_reader(model_path: str | os.PathLike | ir.Model) -> Callable[[Slot], np.ndarray]:
    """A function giving the base weight behind a slot in canonical layout (DoRA's norm needs it).

    The model (a path, or a loaded model) is loaded (lazily, memory-mapped) on the first call only:
    non-DoRA adapters never load it.
    """
    cache: dict[str, dict[str, ir.Node]] = {}

    def located(slot: Slot):
        if "nodes" not in cache:
            model = model_path if isinstance(model_path, ir.Model) else load_model(model_path)
            cache["nodes"] = {n.name: n for n in model.graph.all_nodes() if n.name}
        node = cache["nodes"].get(slot.node)
        layout = get_layout(node) if node is not None else None
        if layout is None or layout.weight_value(node) is None:
            where = "the model" if isinstance(model_path, ir.Model) else model_path
            raise ModelError(f"{where}: the base weight of slot {slot.module} (node {slot.node!r}) is missing")
        return node, layout

    def read(slot: Slot) -> np.ndarray:
        node, layout = located(slot)
        return layout.read(node)

    def holds(slot: Slot, w: np.ndarray) -> bool:
        node, layout = located(slot)
        return quantized_holds(layout, node, w)

    def stored(slot: Slot) -> tuple[np.dtype | None, bool]:
        node, layout = located(slot)
        return stored_info(layout.weight_value(node), layout)

    def release(slot: Slot) -> None:
        node, layout = located(slot)
        drop_mapped_pages(layout.weight_value(node))

    read.holds = holds  # type: ignore[attr-defined]
    read.stored = stored  # type: ignore[attr-defined]
    read.release = release  # type: ignore[attr-defined]
    return read


def convert_adapter(
    adapter: str | os.PathLike | Adapter,
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    only_targets: str | None = None,
    requantize: bool = False,
    force: bool = False,
) -> dict:
    """Write ``adapter``'s slot tensors for the injected model at ``model_path`` to ``out_path``
    (.onnx_adapter or .safetensors, by suffix). Returns a summary.

    A model without lora_export's slot manifest but with LoRA inputs made by another tool (Olive's
    ExtractAdapters, onnxruntime-genai's builder) gets tensors named, laid out and scaled as its graph
    consumes them (``slots/foreign``; the summary then has ``"foreign": true`` and the graph's scales). Quantized
    (int4) LoRA inputs are written only with ``requantize`` (lossy; the summary's ``"requantized"`` has each
    slot's error).

    An adapter whose base fingerprint does not match the weights behind the model's slots is refused, and
    the file written carries the fingerprint of those weights (``base_check``). An adapter the model's
    history records as merged (its digest, a target's tensors, or its slot tensors)
    is refused, since loading the file would apply it twice; so is a model whose history is unreadable or
    duplicated: both unless ``force``."""
    check_output_file(out_path, AdapterError)
    out_path = Path(out_path)
    if out_path.suffix not in ADAPTER_SUFFIXES:
        raise AdapterError(f"{out_path}: output must end in .onnx_adapter or .safetensors")
    if not isinstance(adapter, Adapter):
        # The output is renamed into place: it must not replace the adapter or model it is made from.
        refuse_overwrite([out_path], [*adapter_files(adapter), Path(model_path)])
        adapter = load_adapter(adapter)
    else:
        refuse_overwrite([out_path], [Path(model_path)])
    adapter = adapter.select(only_targets)
    adapter.check_finite()
    header = _header(model_path)
    props = dict(header.metadata_props)
    history = history_or_refusal(safe_history(header), force, "use --force to convert anyway")
    hint = "use --force to convert anyway"
    refuse(merged_repeat(history, adapter), force, hint, "loading its slot file would apply it twice")
    if SLOTS_KEY not in props:
        return _convert_foreign(adapter, model_path, out_path, requantize)
    manifest = read_manifest(model_path)
    read = weight_reader(model_path)
    found = mismatch(adapter.base_fingerprint or {}, slot_weights(manifest, read, history))
    refuse_mismatch(found, f"adapter {adapter.name!r}", "this model's", force, hint)
    tensors = adapter_tensors(adapter, manifest, read)
    why = slots_repeat(history, slot_digests(tensors, manifest), f"adapter {adapter.name!r}")
    refuse(why, force, hint, "loading its slot file would apply it twice")
    covered = sorted({m for m in adapter.targets if m in manifest.slots})
    fingerprint = slot_file_entries(manifest, read, covered)
    write_adapter_tensors(out_path, tensors, model_version=manifest.fingerprint, fingerprint=fingerprint)
    return {
        "adapter": adapter.name,
        "output": str(out_path),
        "slots_filled": covered,
        "slots_default": sorted(set(manifest.slots) - set(covered)),
        "tensors": len(tensors),
    }


def _convert_foreign(adapter: Adapter, model_path: str | os.PathLike, out_path: Path, requantize: bool) -> dict:
    """convert for a model with LoRA inputs made by another tool (Olive, onnxruntime-genai): see foreign_slots."""
    model = load_model(model_path)
    if not lora_input_names(model):
        # Neither ours nor anyone's LoRA inputs: the usual line for a model that was never injected.
        read_manifest(model_path)
    slots = read_model_slots(model)
    writer = QuantWriter(model)
    tensors, summary = foreign_tensors(adapter, slots, writer)
    lossy = [m for m in summary["slots_filled"] if slots[m].quantized]
    if lossy and not requantize:
        shown = ", ".join(lossy[:3]) + (f", ... ({len(lossy) - 3} more)" if len(lossy) > 3 else "")
        schemes = ", ".join(sorted({slots[m].scheme for m in lossy}))
        raise TargetError(
            f"{len(lossy)} LoRA slots of the model take quantized tensors ({schemes}): {shown}; writing the adapter "
            "rounds its A and B (lossy, the error is reported per slot): pass --requantize to accept that"
        )
    write_adapter_tensors(out_path, tensors, model_version=slots_fingerprint(slots))
    report = {"adapter": adapter.name, "output": str(out_path), "foreign": True, **summary, "tensors": len(tensors)}
    if writer.report:
        report["requantized"] = writer.report
    return report


def write_zero_adapter(model_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """An adapter file that makes a LoRA-input model made by another tool compute its base model: zeros in
    every slot whose inputs have no "no adapter" default (exact: the branches add 0; quantized zeros too, as
    zero quantizes to its zero point). For Olive's int4 LoRA models, whose rank-0 defaults do not run on
    ONNX Runtime 1.31, this is how to run them without an adapter."""
    from lora_export.core.config import LoraConfig

    check_output_file(out_path, AdapterError)
    out_path = Path(out_path)
    if out_path.suffix not in ADAPTER_SUFFIXES:
        raise AdapterError(f"{out_path}: output must end in .onnx_adapter or .safetensors")
    refuse_overwrite([out_path], [Path(model_path)])
    if SLOTS_KEY in _metadata(model_path):
        raise ConfigError(f"{model_path}: its lora_export slots default to rank 0, so it runs without an adapter")
    model = load_model(model_path)
    if not lora_input_names(model):
        read_manifest(model_path)
    slots = read_model_slots(model)
    tensors, summary = foreign_tensors(Adapter(targets={}, config=LoraConfig(), name="zero"), slots, QuantWriter(model))
    if not tensors:
        raise ConfigError(f"{model_path}: every LoRA input defaults to no adapter; it runs without an adapter file")
    write_adapter_tensors(out_path, tensors, model_version=slots_fingerprint(slots))
    return {"adapter": None, "output": str(out_path), "foreign": True, **summary, "tensors": len(tensors)}

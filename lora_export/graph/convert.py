"""``convert``: turn a (later) adapter into slot tensors for an already-injected model.

The injected model's slot manifest says which inputs exist, their layouts and dtype; the adapter's
targets are mapped by module path. Misfits are refused, all named in one line. An adapter may cover a
subset of the slots: the others keep their rank-0 defaults. Models with LoRA inputs made by other tools
(Olive, onnxruntime-genai) have no manifest: their slots are read from the graph (``foreign_slots``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..adapter import Adapter
from ..errors import AdapterError, ModelError
from ..files.atomic import refuse_overwrite
from ..files.checks import check_output_file, require_regular_file
from ..formats.adapter_files import ADAPTER_SUFFIXES, write_adapter_tensors
from ..formats.peft import adapter_files, load_adapter
from .foreign_slots import foreign_tensors, lora_input_names, read_foreign_slots, slots_fingerprint
from .layouts import get_layout
from .model_io import load_model
from .slots import SLOTS_KEY, Slot, SlotManifest, adapter_tensors
from .value_match import quantized_holds


def _metadata(model_path: str | os.PathLike) -> dict[str, str]:
    import onnx

    require_regular_file(model_path, "model", ModelError)
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{model_path}: not a readable ONNX model ({type(e).__name__})") from None
    return {p.key: p.value for p in proto.metadata_props}


def read_manifest(model_path: str | os.PathLike) -> SlotManifest:
    """The slot manifest of an injected model (metadata only; weights are not read)."""
    return SlotManifest.from_json(_metadata(model_path).get(SLOTS_KEY))


def weight_reader(model_path: str | os.PathLike) -> Callable[[Slot], np.ndarray]:
    """A function giving the base weight behind a slot in canonical layout (DoRA's norm needs it).

    The model is loaded (lazily, memory-mapped) on the first call only: non-DoRA adapters never load it.
    """
    cache: dict[str, dict[str, ir.Node]] = {}

    def located(slot: Slot):
        if "nodes" not in cache:
            cache["nodes"] = {n.name: n for n in load_model(model_path).graph.all_nodes() if n.name}
        node = cache["nodes"].get(slot.node)
        layout = get_layout(node) if node is not None else None
        if layout is None or layout.weight_value(node) is None:
            raise ModelError(f"{model_path}: the base weight of slot {slot.module} (node {slot.node!r}) is missing")
        return node, layout

    def read(slot: Slot) -> np.ndarray:
        node, layout = located(slot)
        return layout.read(node)

    def holds(slot: Slot, w: np.ndarray) -> bool:
        node, layout = located(slot)
        return quantized_holds(layout, node, w)

    read.holds = holds  # type: ignore[attr-defined]
    return read


def convert_adapter(
    adapter: str | os.PathLike | Adapter,
    model_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    only_targets: str | None = None,
) -> dict:
    """Write ``adapter``'s slot tensors for the injected model at ``model_path`` to ``out_path``
    (.onnx_adapter or .safetensors, by suffix). Returns a summary.

    A model without lora_export's slot manifest but with LoRA inputs made by another tool (Olive's
    ExtractAdapters, onnxruntime-genai's builder) gets tensors named, laid out and scaled as its graph
    consumes them (``foreign_slots``; the summary then has ``"foreign": true`` and the graph's scales)."""
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
    if SLOTS_KEY not in _metadata(model_path):
        return _convert_foreign(adapter, model_path, out_path)
    manifest = read_manifest(model_path)
    tensors = adapter_tensors(adapter, manifest, weight_reader(model_path))
    write_adapter_tensors(out_path, tensors, model_version=manifest.fingerprint)
    covered = sorted({m for m in adapter.targets if m in manifest.slots})
    return {
        "adapter": adapter.name,
        "output": str(out_path),
        "slots_filled": covered,
        "slots_default": sorted(set(manifest.slots) - set(covered)),
        "tensors": len(tensors),
    }


def _convert_foreign(adapter: Adapter, model_path: str | os.PathLike, out_path: Path) -> dict:
    """convert for a model with LoRA inputs made by another tool (Olive, onnxruntime-genai): see foreign_slots."""
    model = load_model(model_path)
    if not lora_input_names(model):
        # Neither ours nor anyone's LoRA inputs: the usual line for a model that was never injected.
        read_manifest(model_path)
    slots = read_foreign_slots(model)
    tensors, summary = foreign_tensors(adapter, slots)
    write_adapter_tensors(out_path, tensors, model_version=slots_fingerprint(slots))
    return {"adapter": adapter.name, "output": str(out_path), "foreign": True, **summary, "tensors": len(tensors)}

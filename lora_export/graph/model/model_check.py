"""One validation pass over a freshly loaded ONNX model, so that nothing later trips over a corrupt file.

Checked here, once, instead of in every reader: initializer data that does not fit its shape and dtype
(inline or external), the inputs and attribute types of the ops LoRA reads weights from, and the JSON
metadata lora-export stores in models. A model that fails gets one ModelError naming the first problem.
Reading no tensor data beyond what the protobuf already holds in memory: external data stays unread.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx_ir as ir

from lora_export import safejson
from lora_export.errors import ModelError

MANIFEST_KEY = "lora_export.manifest"  # torch_export's key (not imported from there: that imports torch)

# Inputs an op cannot run without (a later optional input may be omitted with an empty name).
_REQUIRED_INPUTS = {"MatMul": 2, "Gemm": 2, "Conv": 2, "Gather": 2, "Transpose": 1}
_ATTRIBUTE_TYPES = {
    "Gemm": {"transA": ir.AttributeType.INT, "transB": ir.AttributeType.INT, "alpha": ir.AttributeType.FLOAT,
             "beta": ir.AttributeType.FLOAT},
    "Conv": {"group": ir.AttributeType.INT, "kernel_shape": ir.AttributeType.INTS},
    "Gather": {"axis": ir.AttributeType.INT},
    "Transpose": {"perm": ir.AttributeType.INTS},
}  # fmt: skip
# Complex values take two entries of their typed field (real, imaginary).
_COMPLEX = {ir.DataType.COMPLEX64, ir.DataType.COMPLEX128}


_CHECKED = "lora_export.checked"


def ensure_checked(model: ir.Model, what: str = "model") -> None:
    """``check_model`` for a model built in memory (the API's ``merge_adapter``/``inject_adapters``);
    a model that came through ``load_model`` was checked already."""
    if not model.meta.get(_CHECKED):
        check_model(model, Path(what))


def check_model(model: ir.Model, path: Path) -> None:
    """Raise a one-line ModelError for the first structural problem in ``model`` (loaded from ``path``)."""
    for key, value in model.metadata_props.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ModelError(f"{path}: metadata entry {safejson.short_repr(key)} is not valid UTF-8")
    _check_metadata(model, path)
    for graph in model.graphs():
        _check_names(graph, path)
        for value in graph.initializers.values():
            problem = _tensor_problem(value.const_value) if value.const_value is not None else None
            if problem:
                raise ModelError(f"{path}: corrupt initializer {safejson.short_repr(value.name)}: {problem}")
        for node in graph:
            problem = _node_problem(node)
            if problem:
                raise ModelError(f"{path}: invalid {node.op_type} node {safejson.short_repr(node.name)}: {problem}")
    model.meta[_CHECKED] = True


def _check_names(graph: ir.Graph, path: Path) -> None:
    # Protobuf hands out undecodable strings as bytes: every name would then break str operations.
    for node in graph:
        texts = [node.name, node.op_type, node.domain, *(v.name for v in node.outputs)]
        texts += [v.name for v in node.inputs if v is not None]
        if not all(isinstance(t, (str, type(None))) for t in texts):
            raise ModelError(f"{path}: node {safejson.short_repr(node.name)} has a name that is not valid UTF-8")
    for value in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
        if not isinstance(value.name, (str, type(None))):
            raise ModelError(f"{path}: value {safejson.short_repr(value.name)} has a name that is not valid UTF-8")


def _check_metadata(model: ir.Model, path: Path) -> None:
    from .slot_manifest import SLOTS_KEY, SlotManifest

    text = model.metadata_props.get(MANIFEST_KEY)
    if text is not None and not _manifest_ok(text):
        raise ModelError(f"{path}: corrupt {MANIFEST_KEY} metadata (not the exporter's JSON object)")
    text = model.metadata_props.get(SLOTS_KEY)
    if text == "":
        raise ModelError(f"{path}: corrupt {SLOTS_KEY} metadata (empty)")
    if text is not None:
        try:
            SlotManifest.from_json(text)
        except ModelError as e:
            raise ModelError(f"{path}: {e}") from None


def _manifest_ok(text: str) -> bool:
    try:
        data = safejson.loads(text)
    except ValueError:
        return False
    modules = data.get("modules", {}) if isinstance(data, dict) else None
    if not isinstance(modules, dict):
        return False
    return all(
        isinstance(entry, dict)
        and all(isinstance(entry.get(k, ""), (str, type(None))) for k in ("initializer", "node"))
        for entry in modules.values()
    )


def _tensor_problem(tensor: ir.TensorProtocol) -> str | None:
    dtype = tensor.dtype
    dims = list(tensor.shape.dims)
    if dtype == ir.DataType.UNDEFINED:
        return "undefined data type"
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        return f"invalid shape {safejson.short_repr(dims)}"
    numel = math.prod(dims)
    if isinstance(tensor, ir.ExternalTensor):
        want = _nbytes(dtype, numel)
        if want is not None and tensor.length is not None and tensor.length != want:
            return f"external data length {tensor.length} does not match its {dtype.name} shape {dims} ({want} bytes)"
        return None
    proto = getattr(tensor, "raw", None)
    if isinstance(tensor, ir.StringTensor):
        # onnx-ir reads strings from string_data only (raw_data is ignored): the count must fit the shape.
        have = len(proto) if proto is not None else 0
        return None if have == numel else f"{have} strings for shape {dims} ({numel} expected)"
    if not hasattr(proto, "HasField"):
        return None  # an in-memory tensor built by a library, not parsed from a file
    if proto.HasField("raw_data"):
        want = _nbytes(dtype, numel)
        have = len(proto.raw_data)
        if want is None:
            return f"{dtype.name} data cannot be stored as raw bytes"
        if have != want:
            return f"{have} bytes of data for {dtype.name} shape {dims} ({want} expected)"
        return None
    bits = _bitwidth(dtype)
    if bits is not None and bits < 8:
        return None  # packed sub-byte typed data: ONNX's packing rules vary by version; ir checks on read
    field = _typed_field(proto, dtype)
    if field is None:
        return None
    have = len(getattr(proto, field))
    want = numel * (2 if dtype in _COMPLEX else 1)
    if have != want:
        return f"{have} values in {field} for {dtype.name} shape {dims} ({want} expected)"
    return None


def _bitwidth(dtype: ir.DataType) -> int | None:
    try:
        return dtype.bitwidth
    except TypeError:  # STRING: no fixed width
        return None


def _nbytes(dtype: ir.DataType, numel: int) -> int | None:
    bits = _bitwidth(dtype)
    return None if bits is None else math.ceil(numel * bits / 8)


def _typed_field(proto, dtype: ir.DataType) -> str | None:
    from onnx.helper import tensor_dtype_to_field

    try:
        return tensor_dtype_to_field(int(dtype))
    except (KeyError, ValueError, TypeError):
        return None


def _node_problem(node: ir.Node) -> str | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in _REQUIRED_INPUTS:
        return None
    need = _REQUIRED_INPUTS[node.op_type]
    missing = [i for i in range(need) if i >= len(node.inputs) or node.inputs[i] is None]
    if missing:
        return f"required input {missing[0]} is missing ({len(node.inputs)} given)"
    for name, want in _ATTRIBUTE_TYPES.get(node.op_type, {}).items():
        attr = node.attributes.get(name)
        if attr is not None and attr.type != want:
            return f"attribute {name} must be {want.name}, got {attr.type.name}"
    return None

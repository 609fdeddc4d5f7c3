"""The model ONNX Runtime opens for a ``MergedSession``: the base, with some initializers turned into graph
inputs (fed from memory the caller owns). Its other external data stays where the base keeps it.

On the CPU, a float32 weight read as a MatMul's B (stored Wᵀ, in × out) is fed transposed instead (W, out × in)
to a ``com.microsoft`` FusedMatMul with ``transB=1`` (a Gemm's ``transB`` is flipped): an unprepacked B is
packed by MLAS at every call, and packing a transposed B costs about half as much (benchmarks/hot_swap.py,
ORT's profiler: the 24 q/v MatMuls of a 162M LLaMA take 1.2× the prepacked kernels' time instead of 1.4×).
The weights are the same numbers; only the buffer's orientation differs, and each switch pays a transpose:
cheap while the weight fits the cache (768×768: 0.2 ms), 8–30 ms beyond (2048×2048, 3072×3072): a 954M
LLaMA's runs take 1.025× a plain session's instead of 1.058×, its switch 0.5 s instead of 0.27 s.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..errors import ModelError, one_line

# ONNX Runtime's config key for the folder external data is read from when a model is given as bytes.
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"
_FLOAT = 1  # TensorProto.FLOAT


def session_model(
    path: Path, owned: set[str], sess_options: ort.SessionOptions, *, external: bool, transpose: bool = False
) -> tuple[str | bytes, set[str]]:
    """``path`` itself when nothing is owned; else the serialized graph with ``owned`` initializers as
    inputs (``sess_options`` then point ONNX Runtime at the base's folder for the rest of its external data).

    With ``transpose``, the owned weights that only a MatMul/Gemm reads as a plain float32 B are declared
    transposed and their nodes rewritten to read them so; the second item names them.
    """
    if not owned:
        return str(path), set()
    import onnx  # the protobuf API, only when a graph is rewritten

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises many types for a corrupt file
        raise ModelError(f"{path}: not a readable ONNX model ({one_line(e)})") from None
    graph = proto.graph
    keep = [t for t in graph.initializer if t.name not in owned]
    found = {t.name: t for t in graph.initializer if t.name in owned}
    missing = owned - set(found)
    if missing:
        raise ModelError(f"{path}: initializer(s) {', '.join(sorted(missing)[:3])} not in the main graph")
    flipped = _transpose_readers(proto, found) if transpose else set()
    declared = {i.name for i in graph.input}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for name in sorted(owned):
        dims = list(found[name].dims)
        if name in flipped:
            dims = dims[::-1]
            if name in declared:  # an old-IR model listing initializers as inputs: fix the declared shape
                graph.input.remove(next(i for i in graph.input if i.name == name))
                declared.discard(name)
        if name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(name, found[name].data_type, dims))
    if external:
        sess_options.add_session_config_entry(_EXTERNAL_FOLDER, str(Path(path).resolve().parent))
    return proto.SerializeToString(), flipped


def _transpose_readers(proto, found: dict) -> set[str]:
    """Rewrite the main-graph MatMul/Gemm nodes that read one of ``found`` (2-D float32) as their B, and
    nothing else reads it, to read its transpose; return the names rewritten."""
    from onnx import helper

    readers: dict[str, list] = {}
    for node, top in _nodes(proto.graph, True):
        for name in set(node.input):
            if name in found:
                readers.setdefault(name, []).append((node, top))
    outputs = {o.name for o in proto.graph.output}
    flipped = set()
    for name, nodes in readers.items():
        t = found[name]
        if len(nodes) != 1 or name in outputs or t.data_type != _FLOAT or len(t.dims) != 2:
            continue
        node, top = nodes[0]
        if not top or node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] != name:
            continue
        if node.input[0] == name or list(node.input).count(name) != 1:
            continue
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMul":
            node.op_type, node.domain = "FusedMatMul", "com.microsoft"
            node.attribute.append(helper.make_attribute("transB", 1))
        elif node.op_type == "Gemm" and not (attrs.get("transB") and attrs["transB"].i):
            if "transB" in attrs:
                node.attribute.remove(attrs["transB"])
            node.attribute.append(helper.make_attribute("transB", 1))
        else:
            continue
        flipped.add(name)
    if flipped and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return flipped


def _nodes(graph, top: bool):
    """Every node of ``graph`` and its subgraphs, with whether it is in the main graph."""
    for node in graph.node:
        yield node, top
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _nodes(sub, False)

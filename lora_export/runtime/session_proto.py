"""The model ONNX Runtime opens for a ``MergedSession``: the base, with some initializers turned into graph
inputs (fed from memory the caller owns). Its other external data stays where the base keeps it."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..errors import ModelError, one_line

# ONNX Runtime's config key for the folder external data is read from when a model is given as bytes.
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def session_model(path: Path, owned: set[str], sess_options: ort.SessionOptions, *, external: bool) -> str | bytes:
    """``path`` itself when nothing is owned; else the serialized graph with ``owned`` initializers as
    inputs (``sess_options`` then point ONNX Runtime at the base's folder for the rest of its external data)."""
    if not owned:
        return str(path)
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
    declared = {i.name for i in graph.input}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for name in sorted(owned):
        if name not in declared:  # an old-IR model may list its initializers as inputs already
            graph.input.append(onnx.helper.make_tensor_value_info(name, found[name].data_type, list(found[name].dims)))
    if external:
        sess_options.add_session_config_entry(_EXTERNAL_FOLDER, str(Path(path).resolve().parent))
    return proto.SerializeToString()

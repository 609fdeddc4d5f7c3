"""Module paths: how PyTorch module names show up in ONNX names and exporter metadata.

Matching is by dotted suffix, so wrapper prefixes on either side (``model.``, ``base_model.model.``,
``_orig_mod.``) do not matter, and a match must be unique to count.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Mapping

import onnx_ir as ir

from lora_export.errors import some

# Prefixes that wrappers add to every parameter path (PEFT, torch.compile, DataParallel).
WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")
_WEIGHT_SUFFIXES = (".weight", ".base_layer.weight")
_CALL_INDEX = re.compile(r"@\d+$")
_OP_SUFFIX = re.compile(r"_\d+$")


def strip_wrappers(path: str) -> str:
    """Drop wrapper prefixes (``base_model.model.``, ``_orig_mod.``, ``module.``), repeatedly."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if path.startswith(p):
                path, changed = path[len(p) :], True
    return path


def suffix_score(a: str, b: str) -> int:
    """Common trailing dotted segments when one path is a dotted suffix of the other, else 0.

    ``model.layers.0.q_proj`` vs ``layers.0.q_proj`` → 3; ``layers.0.q_proj`` vs ``layers.1.q_proj`` → 0.
    """
    sa, sb = strip_wrappers(a).split("."), strip_wrappers(b).split(".")
    if not a or not b:
        return 0
    n = min(len(sa), len(sb))
    if sa[-n:] != sb[-n:]:
        return 0
    return n


def best_unique(path: str, keyed: Mapping[str, list]) -> tuple[str | None, list, str]:
    """The key whose path best suffix-matches ``path``; (key, items, why) or (None, [], why)."""
    best, best_keys = 0, []
    for key in keyed:
        s = suffix_score(path, key)
        if s > best:
            best, best_keys = s, [key]
        elif s and s == best:
            best_keys.append(key)
    if not best_keys:
        return None, [], "no name matches"
    if len(best_keys) > 1:
        shown = some(sorted(best_keys))
        return None, [], f"ambiguous: {len(best_keys)} equally good names ({shown})"
    return best_keys[0], keyed[best_keys[0]], ""


def mentions(target_path: str, module_path: str) -> bool:
    """Whether a node's module path shows the target's module (or a sub-module of it) in the graph."""
    t = strip_wrappers(target_path).split(".")
    m = strip_wrappers(module_path).split(".")
    if not module_path:
        return False
    for i in range(len(m) - len(t) + 1):
        if m[i : i + len(t)] == t:
            return True
    # The adapter's path may carry an extra prefix the graph lacks.
    return len(m) <= len(t) and t[-len(m) :] == m and len(m) >= 2


def weight_module(name: str) -> str | None:
    """``a.b.weight`` → ``a.b``; None for names that are not a module's weight."""
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def node_module_paths(node: ir.Node) -> list[str]:
    """Module paths a node's name and exporter metadata attribute it to."""
    return list(dict.fromkeys(scope_module_paths(node) + name_module_paths(node)))


def name_module_paths(node: ir.Node) -> list[str]:
    """The module path in a TorchScript node name: ``/model/layers.0/q_proj/MatMul`` → ``model.layers.0.q_proj``."""
    name = node.name or ""
    if not name.startswith("/"):
        return []
    # Dots inside segments ("layers.0") are kept: they are ModuleList indices.
    segs = [s for s in name.split("/") if s][:-1]
    # Optimizers name a fused node after the node it replaced ("/a/dense/MatMul/MatMulAddFusion").
    while segs and _is_op_name(segs[-1]):
        segs.pop()
    parts: list[str] = []
    for seg in segs:
        # A called container repeats its name in its children's segments ("/a/a.0/MatMul" is a.0).
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return [".".join(parts)] if parts else []


@functools.cache
def _op_names() -> frozenset[str]:
    import onnx

    return frozenset(schema.name for schema in onnx.defs.get_all_schemas_with_history())


def _is_op_name(segment: str) -> bool:
    """``MatMul``, ``MatMul_1``: an exporter's name for an op, not a module."""
    return _OP_SUFFIX.sub("", segment) in _op_names()


def scope_module_paths(node: ir.Node) -> list[str]:
    """Module paths from the dynamo exporter's node metadata (``name_scopes``, ``namespace``)."""
    paths = []
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            names = []
        # The last entry is the FX node (``linear``); the one before it is the innermost module.
        mods = [_CALL_INDEX.sub("", str(n)) for n in names[:-1] if n]
        if mods:
            paths.append(_join_scopes(mods))
    namespace = node.metadata_props.get("namespace")
    if namespace:
        segs = [s.split(":", 1)[0].strip() for s in namespace.split("/")]
        mods = [_CALL_INDEX.sub("", s) for s in segs[:-1] if s]
        if mods:
            paths.append(_join_scopes(mods))
    return list(dict.fromkeys(p for p in paths if p))


def _join_scopes(names: list[str]) -> str:
    # Dynamo writes full paths per level ("model", "model.layers.0"); tolerate relative ones too.
    path = ""
    for n in names:
        path = n if not path or n.startswith(path + ".") else f"{path}.{n}"
    return path

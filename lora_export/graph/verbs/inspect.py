"""What LoRA can target in an ONNX model, and (with an adapter) where each target resolves.

Also what lora-export did to the model (its ``lora_export.history``: merges, injects) and, for an
injected model, its LoRA slots (whose rank-0 default inputs are not weights to target).

Metadata only: shapes and dtypes come from the initializers' headers, so inspecting a model with
gigabytes of external data reads none of it (unless ``base_weights`` asks for fingerprinting).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import onnx_ir as ir

from lora_export.errors import LoraExportError
from lora_export.terminal import clean

from ..match.module_paths import node_module_paths, weight_module
from ..model.model_io import load_model
from ..model.provenance import HistoryError, merged_targets, merges_of, read_history, summarize


@dataclass
class TargetableWeight:
    """One initializer a registered op layout can adapt."""

    node: str | None
    op: str
    initializer: str | None
    kind: str
    shape: list[int]
    dtype: str
    layout: str
    module: str | None
    module_source: str | None  # "manifest" | "initializer-name" | "node-name/scope" | None
    shared_by: int

    def to_dict(self) -> dict:
        return asdict(self)


def targetable_weights(model: ir.Model, slot_inputs: set[str] | frozenset[str] = frozenset()) -> list[TargetableWeight]:
    """Every weight LoRA can target, one row per initializer (first consumer), in graph order.

    ``slot_inputs`` (an injected model's LoRA inputs) are no weights: they and the branch nodes that
    read them are left out.
    """
    from ..targets.resolve import candidate_weights, read_manifest

    manifest = read_manifest(model)
    by_init = {e.get("initializer"): path for path, e in manifest.items() if isinstance(e, dict)}
    consumers: dict[int, int] = {}
    first: dict[int, tuple] = {}
    for node, layout, value in candidate_weights(model):
        if value.name in slot_inputs:
            continue
        consumers[id(value)] = consumers.get(id(value), 0) + 1
        first.setdefault(id(value), (node, layout, value))
    rows = []
    for key, (node, layout, value) in first.items():
        shape = layout.weight_shape(node)
        tensor = value.const_value
        module, source = _module_of(node, value, by_init)
        rows.append(
            TargetableWeight(
                node=node.name,
                op=node.op_type if not node.domain else f"{node.domain}::{node.op_type}",
                initializer=value.name,
                kind=layout.kind,
                shape=[int(d) for d in shape] if shape is not None else [],
                dtype=str(tensor.dtype.name).lower() if tensor is not None else "?",
                layout=layout.describe(node),
                module=module,
                module_source=source,
                shared_by=consumers[key],
            )
        )
    return rows


def _module_of(node: ir.Node, value: ir.Value, manifest: dict) -> tuple[str | None, str | None]:
    if value.name in manifest:
        return manifest[value.name], "manifest"
    from_name = weight_module(value.name or "")
    if from_name:
        return from_name, "initializer-name"
    paths = node_module_paths(node)
    return (paths[0], "node-name/scope") if paths else (None, None)


def inspect_model(
    path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    base_weights: str | os.PathLike | None = None,
    only_targets: str | None = None,
) -> dict:
    """A JSON-able description of ``path``'s targetable weights and, given an adapter, its resolution."""
    model = load_model(path)
    slots = _slots(model)
    slot_inputs = {name for s in slots for name in s["inputs"]}
    rows = targetable_weights(model, slot_inputs)
    from ..targets.resolve import read_manifest

    report: dict = {
        "model": str(path),
        "manifest": bool(read_manifest(model)),
        "targetable": [r.to_dict() for r in rows],
    }
    report.update(_history(model))
    if slots:
        report["slots"] = slots
        from ..slots.per_row import pool_report

        per_row = pool_report(model, path)
        if per_row is not None:
            report["per_row"] = per_row
    if adapter is None:
        if base_weights is not None:
            raise LoraExportError("--base-weights only matters with an adapter")
        return report
    from lora_export.formats.peft import load_adapter

    from ..targets.resolve import resolve_targets
    from ..targets.vera_bind import bind_to_graph

    loaded = load_adapter(adapter).select(only_targets)
    weights = None
    if base_weights is not None:
        from lora_export.files.checks import require_regular_file
        from lora_export.formats.safetensors import read_safetensors

        require_regular_file(base_weights, "base weights")
        weights = read_safetensors(base_weights)[0]
    from ..targets.genai_names import read_genai_config

    loaded = bind_to_graph(model, loaded, weights)  # VeRA: A′ needs each layer's input size
    digest = loaded.digest()
    resolution = resolve_targets(model, loaded, base_weights=weights, genai_dims=read_genai_config(path))
    report["adapter"] = str(adapter)
    report["adapter_sha256"] = digest
    report["already_merged"] = _already_merged(report.get("history") or [], loaded, digest)
    report["resolution"] = resolution.to_report()
    from .base_check import fingerprint_report

    report["base_fingerprint"] = fingerprint_report(loaded, resolution.matched, report.get("history") or [], weights)
    report["extras"] = [e.to_dict() for e in resolution.extras]
    report["counts"] = {
        "matched": len(resolution.matched),
        "absent": len(resolution.absent),
        "unmatched": len(resolution.unmatched),
    }
    return report


def _already_merged(history: list[dict], adapter, digest: str) -> list[int]:
    """History records that merged this adapter, or one of its targets with the same tensors (what merge refuses)."""
    from lora_export.core.adapter import target_digest

    before = merged_targets(history)
    hits = {before.get((t.name, target_digest(t))) for t in adapter} - {None}
    return sorted(set(merges_of(history, digest)) | hits)


def _slots(model: ir.Model) -> list[dict]:
    """An injected model's slots (``lora_export.slots``), sorted by module; [] for other models."""
    from ..model.slot_manifest import SLOTS_KEY, SlotManifest

    if SLOTS_KEY not in model.metadata_props:
        return []
    manifest = SlotManifest.from_json(model.metadata_props[SLOTS_KEY])  # corrupt: one-line ModelError
    return [
        {
            "module": s.module,
            "op": s.op,
            "kind": s.kind,
            "rank_dim": s.rank_dim,
            "dtype": s.dtype,
            "dora": bool(s.dora),
            "weight": s.weight,
            "weight_shape": list(s.weight_shape),
            "node": s.node,
            "inputs": s.inputs,
            **({"packed": {"offset": s.packed[0], "total": s.packed[1]}} if s.packed is not None else {}),
        }
        for _, s in sorted(manifest.slots.items())
    ]


def _history(model: ir.Model) -> dict:
    """``{"history": [...]}``, or with an unreadable history ``{"history": None, "history_error": why}``."""
    try:
        return {"history": read_history(model)}
    except HistoryError as e:
        return {"history": None, "history_error": str(e)}


def format_report(report: dict) -> str:
    """The human-readable tables for ``lora-export inspect``."""
    lines = [f"{clean(report['model'])}: {len(report['targetable'])} targetable weight(s)"]
    if not report.get("manifest"):
        lines[0] += " (no lora-export manifest; module paths inferred from names)"
    header = ("module", "op", "initializer", "shape", "dtype", "layout", "node")
    rows = [
        (
            r["module"] or "-",
            r["op"] + (f" x{r['shared_by']}" if r["shared_by"] > 1 else ""),
            r["initializer"] or "-",
            "x".join(map(str, r["shape"])),
            r["dtype"],
            r["layout"],
            r["node"] or "-",
        )
        for r in report["targetable"]
    ]
    lines += _table(header, rows)
    if report.get("slots"):
        lines += ["", f"injected model: {len(report['slots'])} LoRA slot(s) (inputs default to rank 0: the base)"]
        header = ("module", "op", "kind", "rank dim", "dtype", "dora", "base weight")
        rows = [
            (s["module"], s["op"], s["kind"], s["rank_dim"], s["dtype"], "yes" if s["dora"] else "no", s["weight"])
            for s in report["slots"]
        ]
        lines += _table(header, rows)
    if report.get("per_row"):
        lines += _format_pool(report["per_row"])
    lines += ["", *_format_history(report)]
    if "resolution" in report:
        c = report["counts"]
        lines += [
            "",
            f"adapter {clean(report['adapter'])}: "
            f"{c['matched']} matched, {c['absent']} absent, {c['unmatched']} unmatched"
            f" (sha256 {report['adapter_sha256'][:12]})",
        ]
        if report.get("already_merged"):
            lines.append(
                f"already merged into this model (history record {', '.join(map(str, report['already_merged']))})"
            )
        if "base_fingerprint" in report:
            from .base_check import format_fingerprint

            lines.append(format_fingerprint(report["base_fingerprint"]))
        header = ("target", "kind", "rank", "status", "strategy", "initializer", "detail")
        rows = [
            (
                r["target"],
                r["kind"],
                str(r["rank"]),
                r["status"],
                r["strategy"] or "-",
                r["initializer"] or "-",
                r["detail"] or "",
            )
            for r in report["resolution"]
        ]
        lines += _table(header, rows)
        extras = report.get("extras") or []
        if extras:
            resolved = sum(e["status"] == "matched" for e in extras)
            lines += ["", f"full replacement tensors: {len(extras)} ({resolved} resolve)"]
            header = ("tensor", "shape", "status", "strategy", "initializer", "detail")
            rows = [
                (
                    e["tensor"],
                    "x".join(map(str, e["shape"])) or "scalar",
                    e["status"],
                    e["strategy"] or "-",
                    e["initializer"] or "-",
                    e["detail"] or "",
                )
                for e in extras
            ]
            lines += _table(header, rows)
    return "\n".join(lines)


def _format_pool(pr: dict) -> list[str]:
    """Per-row slots: the ids input, and the pool file's entries and ranks."""
    lines = ["", f"per-row adapters: input {clean(pr['ids'])} picks each row's pool entry ({pr['none']}: none)"]
    if pr.get("pool_file") is None:
        return lines + ["no pool.safetensors beside the model"]
    entries = pr.get("entries") or {}
    lines.append(f"{clean(pr['pool_file'])}: {len(entries)} adapter(s)")
    lines += _table(("id", "adapter"), [(str(i), clean(n)) for n, i in sorted(entries.items(), key=lambda kv: kv[1])])
    ranks = sorted(set(pr.get("ranks", {}).values()))
    lines.append(f"pool ranks (largest per slot, zero-padded): {', '.join(map(str, ranks)) or 'none'}")
    return lines


def _format_history(report: dict) -> list[str]:
    if report.get("history_error"):
        return [f"history: unreadable ({report['history_error']})"]
    history = report.get("history") or []
    if not history:
        return ["history: none (no merge or inject by lora-export recorded)"]
    lines = [f"history: {len(history)} record(s), oldest first"]
    header = ("#", "operation", "adapter", "sha256", "scale", "version", "targets")
    rows = [
        (
            str(i),
            r["operation"] + (" (forced)" if r.get("forced") else ""),
            r["adapter"],
            r["adapter_sha256"][:12],
            f"{r['scale']:g}",
            r["version"],
            summarize(r),
        )
        for i, r in enumerate(history, 1)
    ]
    return lines + _table(header, rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    # Names come from the files: escaped, so a newline or an escape sequence in one cannot break the table.
    rows = [tuple(clean(x) for x in row) for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    out += [fmt.format(*row).rstrip() for row in rows]
    return out

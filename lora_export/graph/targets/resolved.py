"""What target resolution returns: where each LoRA target landed in the graph (``ResolvedTarget``), and the
resolution of a whole adapter (``Resolution``). The strategies that fill them are in ``targets.resolve``."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from lora_export.core.adapter import LoraTarget

from ..ops.layouts import OpLayout
from .extras import ResolvedExtra


@dataclass
class ResolvedTarget:
    """Where one LoRA target landed in the graph, and how it was found (or why not)."""

    target: LoraTarget
    status: str  # "matched" | "absent" | "unmatched"
    strategy: str | None = None
    value: ir.Value | None = None
    node: ir.Node | None = None
    layout: OpLayout | None = None
    # The nodes that apply this module (a module called twice has two); other readers of the weight.
    nodes: list[ir.Node] = field(default_factory=list)
    detail: str = ""
    # A weight found by name whose shape does not fit the adapter (canonical layout), if any.
    found_shape: tuple[int, ...] | None = None
    shared_with: list[str] = field(default_factory=list)
    key: str | None = None  # the graph name the match came from

    def to_dict(self) -> dict:
        t = self.target
        out = {
            "target": t.name,
            "kind": t.kind,
            "rank": t.rank,
            "weight_shape": list(t.weight_shape),
            "status": self.status,
            "strategy": self.strategy,
            "initializer": self.value.name if self.value is not None else None,
            "node": self.node.name if self.node is not None else None,
            "op": self.node.op_type if self.node is not None else None,
            "layout": self.layout.describe(self.node) if self.layout is not None and self.node is not None else None,
            "shared_by": len(self.nodes),
            "detail": self.detail,
        }
        if self.shared_with:
            out["shared_with"] = list(self.shared_with)
        if self.found_shape is not None:
            out["found_shape"] = list(self.found_shape)
        return out


@dataclass
class Resolution:
    """The resolution of every target of an adapter, in adapter order, and of its extra tensors."""

    targets: list[ResolvedTarget]
    extras: list[ResolvedExtra] = field(default_factory=list)

    def _with(self, status: str) -> list[ResolvedTarget]:
        return [r for r in self.targets if r.status == status]

    @property
    def matched(self) -> list[ResolvedTarget]:
        return self._with("matched")

    @property
    def absent(self) -> list[ResolvedTarget]:
        return self._with("absent")

    @property
    def unmatched(self) -> list[ResolvedTarget]:
        return self._with("unmatched")

    def to_report(self) -> list[dict]:
        """A JSON-able list, one entry per target."""
        return [r.to_dict() for r in self.targets]

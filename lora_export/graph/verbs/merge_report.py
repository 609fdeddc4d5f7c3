"""What a merge did, as the API returns it and the CLI prints it (``--json``: ``to_dict``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..targets.resolve import Resolution


@dataclass
class MergeReport:
    """What a merge did: how each target resolved, what changed, timings, files written."""

    adapter: str
    resolution: Resolution
    merged: list[dict] = field(default_factory=list)
    replaced: list[dict] = field(default_factory=list)
    converted: list[dict] = field(default_factory=list)  # quantized ops made float MatMuls (--into-float)
    scale: float = 1.0
    adapter_sha256: str | None = None
    history: list[dict] = field(default_factory=list)  # the model's lora_export.history after the merge
    repeated: str | None = None  # why this merge repeats an earlier one (it went ahead with force)
    timings: dict[str, float] = field(default_factory=dict)
    base: str | None = None
    output: str | None = None
    files: list[str] = field(default_factory=list)

    def skipped(self) -> list[dict]:
        """Targets and full tensors left out (``allow_partial``), each with the reason."""
        res = self.resolution
        out = [{"target": r.target.name, "reason": r.detail or r.status} for r in res.unmatched]
        out += [{"target": e.key, "reason": e.detail or e.status} for e in res.extras if e.status == "unmatched"]
        return out

    def to_dict(self) -> dict:
        res = self.resolution
        return {
            "adapter": self.adapter,
            "adapter_sha256": self.adapter_sha256,
            "base": self.base,
            "output": self.output,
            "files": self.files,
            "scale": self.scale,
            "counts": {
                "targets": len(res.targets),
                "matched": len(res.matched),
                "absent": len(res.absent),
                "unmatched": len(res.unmatched),
                "merged_weights": len(self.merged),
                "replaced_tensors": len(self.replaced),
            },
            "targets": res.to_report(),
            "extras": [e.to_dict() for e in res.extras],
            "merged": self.merged,
            "replaced": self.replaced,
            "converted": self.converted,
            "history": self.history,
            "repeated": self.repeated,
            "skipped": self.skipped(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

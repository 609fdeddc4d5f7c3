"""LoRA-drop (arXiv 2402.07721): warm LoRA up on a data sample, measure each module's LoRA output ‖ΔW·x‖²
there, keep the modules that carry most of it (per module type, cumulative share 0.7 here), let the others
share one LoRA; train on, save (each shared LoRA stored once), merge and serve.

Run: ``python samples/lora_drop.py`` (≈ 15 s on 2 CPU cores).
"""

from __future__ import annotations

import copy
import time

import torch
from variant_common import OUT, accuracy, batch, build_base, deploy, show, train

from lora_export import LoraConfig, attach_lora, lora_summary, save_adapter
from lora_export.training.lora_drop import apply_lora_drop, lora_importance


def main() -> None:
    t0 = time.perf_counter()
    base = build_base(layers=6)
    model = attach_lora(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    full = lora_summary(model)["trainable"]
    train(model, steps=10)  # the warm-up
    gen = torch.Generator().manual_seed(3)
    sample = [{"input_ids": batch(gen, size=16)["input_ids"]} for _ in range(4)]
    plan = apply_lora_drop(model, lora_importance(model, sample), threshold=0.7)
    dropped = lora_summary(model)["trainable"]
    loss = train(model, steps=60, seed=1)  # build the optimizer after the drop: the shared LoRA is new
    adapter_dir = save_adapter(model, OUT / "lora_drop" / "adapter")
    figures = {
        "kept (own LoRA)": len(plan.kept),
        "shared groups": {g: len(ms) for g, ms in plan.shared.items()},
        "LoRA parameters trained": f"{dropped:,d} (plain LoRA: {full:,d})",
        "final loss": f"{loss:.3f}",
        "accuracy base -> tuned": f"{accuracy(base):.0%} -> {accuracy(model):.0%}",
    }
    figures.update(deploy(base, adapter_dir, model, OUT / "lora_drop"))
    show("LoRA-drop", figures, t0)


if __name__ == "__main__":
    main()

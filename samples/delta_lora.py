"""Delta-LoRA (arXiv 2309.02411): after K warm-up steps the base weight also moves by λ·Δ(B·A) each step.
The updates telescope, so the deployed model is W₀ + λ·(B_T A_T − B_K A_K) + s·B_T A_T: saved with the
step-K snapshot it is a rank-2r adapter for the untouched base (no full-size weight file).

Run: ``python samples/delta_lora.py`` (≈ 15 s on 2 CPU cores).
"""

from __future__ import annotations

import copy
import time

from variant_common import OUT, accuracy, build_base, deploy, show, train

from lora_export import LoraConfig, attach_lora, lora_summary
from lora_export.training.delta_lora import DeltaLora


def main() -> None:
    t0 = time.perf_counter()
    base = build_base(layers=2)
    model = attach_lora(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    delta = DeltaLora(model, update_ratio=0.5, start_step=10)  # λ and K; lora_dropout must be 0
    loss = train(model, steps=60, after_step=delta.step)
    adapter_dir = delta.save(OUT / "delta_lora" / "adapter")
    figures = {
        "LoRA parameters trained": f"{lora_summary(model)['trainable']:,d} (W moves without gradients)",
        "final loss": f"{loss:.3f}",
        "accuracy base -> tuned": f"{accuracy(base):.0%} -> {accuracy(model):.0%}",
    }
    figures.update(deploy(base, adapter_dir, model, OUT / "delta_lora"))
    show("Delta-LoRA", figures, t0)


if __name__ == "__main__":
    main()

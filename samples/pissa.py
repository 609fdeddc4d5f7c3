"""PiSSA / OLoRA (PEFT's ``init_lora_weights="pissa"|"olora"``): the init moves s·B₀A₀ out of the base
weight, so the trained adapter only fits that residual base. ``lora-export convert-init`` turns it into
plain LoRA at rank 2r for the untouched base (PEFT's ``path_initial_model_for_weight_conversion``);
the unconverted adapter is refused with one line that says so.

Run: ``python samples/pissa.py [pissa|olora]`` (≈ 15 s on 2 CPU cores).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
import warnings

from variant_common import OUT, accuracy, build_base, deploy, show, train

from lora_export import ConfigError, load_adapter

ROOT = OUT.parents[1]


def main(init: str = "pissa") -> None:
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    work = OUT / init
    base = build_base(layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
        peft_model = get_peft_model(copy.deepcopy(base), config)  # rewrites the copy's q/v weights
        peft_model.save_pretrained(str(work / "initial"))  # A₀, B₀: needed for the conversion
        loss = train(peft_model, steps=40, lr=2e-3)
        peft_model.save_pretrained(str(work / "trained"))  # unconverted: fits the residual base only
    try:
        load_adapter(work / "trained")
    except ConfigError as e:
        refused = str(e)
    cli = [sys.executable, "-m", "lora_export"]
    converted = work / "converted"
    done = subprocess.run(
        [*cli, "convert-init", str(work / "trained"), "--initial", str(work / "initial"), "-o", str(converted)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    figures = {
        "unconverted adapter refused": refused[:100] + "...",
        "convert-init": done.stdout.strip(),
        "final loss": f"{loss:.3f}",
        "accuracy base -> tuned": f"{accuracy(base):.0%} -> {accuracy(peft_model):.0%}",
    }
    figures.update(deploy(base, converted, peft_model, work))  # the untouched base + converted adapter
    show(f"{init} via convert-init", figures, t0)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pissa")

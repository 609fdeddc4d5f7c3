"""LoRA variants end to end: AdaLoRA and LoRA-FA trained in PyTorch → merged and served on ONNX.

1. AdaLoRA learns the demo's synthetic task (continue a sequence by +3) on q_proj/v_proj of the demo's
   tiny LLaMA, starting every target at rank 8 and pruning to 4 on average on PEFT's cubic schedule;
   the adapter is saved in PEFT's ADALORA format (PEFT loads it, when installed) and compiles to plain
   LoRA of each target's surviving rank.
2. LoRA-FA learns +5 with every A frozen at its random init (only B trains); the activation memory kept
   for backward is measured with and without.
3. The base is exported once, the AdaLoRA adapter merged and verified; both adapters are injected into
   one model and served from one session, each checked against its PyTorch model.

Run: ``python samples/adalora.py`` (files under ``samples/out/variants/``).
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import demo  # samples/demo.py: the base model, the task, and the ONNX steps through the CLI
import torch

from lora_export import (
    AdaLoraConfig,
    LoraConfig,
    RankAllocator,
    attach_adalora,
    attach_lora,
    attach_lora_fa,
    load_adapter,
    lora_layers,
    orth_regularization,
    save_adapter,
    saved_activation_bytes,
)

OUT_DIR = demo.OUT_DIR / "variants"
STEPS = 200
ADALORA = dict(
    init_r=8, target_r=4, tinit=40, tfinal=60, deltaT=10, total_step=STEPS, lora_alpha=16,
    target_modules=["q_proj", "v_proj"], orth_reg_weight=0.1,
)  # fmt: skip
LORA_FA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def train(model: torch.nn.Module, shift: int, step_hook=None, extra_loss=None) -> None:
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=demo.LR)
    model.train()
    for step in range(STEPS):
        loss = model(**demo.make_batch(gen, shift=shift)).loss
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        optimizer.step()
        note = step_hook(step) if step_hook is not None else ""
        optimizer.zero_grad()
        if step % 40 == 0 or step == STEPS - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}{note}")
    model.eval()


def train_adalora(base: torch.nn.Module) -> tuple[torch.nn.Module, Path]:
    print("\n== AdaLoRA: +3, every target from rank 8 down to 4 on average")
    model = attach_adalora(copy.deepcopy(base), AdaLoraConfig(**ADALORA))
    allocator = RankAllocator(model)

    def allocate(step: int) -> str:
        budget = allocator.update_and_allocate(step)
        return f"  rank budget {budget:3d} (kept {sum(allocator.ranks().values())})"

    train(model, 3, allocate, orth_regularization)
    print("surviving ranks:", {k.replace("model.layers.", "L"): r for k, r in allocator.ranks().items()})
    adapter_dir = save_adapter(model, OUT_DIR / "adalora", base_model_name_or_path="tiny-llama (random, seed 0)")
    adapter = load_adapter(adapter_dir)
    print(f"saved {adapter_dir.name}/ (PEFT's ADALORA format); canonical ranks: {adapter.summary()['ranks']}")
    _check_peft_loads(base, model, adapter_dir)
    return model, adapter_dir


def _check_peft_loads(base: torch.nn.Module, model: torch.nn.Module, adapter_dir: Path) -> None:
    try:
        from peft import PeftModel
    except ImportError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about AdaLoRA's unused r and the random base
        ref = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    ids = demo.example_inputs(3)["input_ids"]
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, ref(input_ids=ids).logits
    print(f"PEFT loads it: max relative difference {((got - want).abs().max() / want.abs().max()).item():.1e}")


def train_lora_fa(base: torch.nn.Module) -> tuple[torch.nn.Module, Path]:
    print("\n== LoRA-FA: +5, A frozen at init, only B trains")
    model = attach_lora_fa(copy.deepcopy(base), LoraConfig(**LORA_FA))
    a0 = {n: m.lora_A.detach().clone() for n, m in lora_layers(model).items()}
    train(model, 5)
    assert all(torch.equal(m.lora_A, a0[n]) for n, m in lora_layers(model).items()), "A moved"
    print("every A is bit-identical to its init")
    batch = demo.make_batch(torch.Generator().manual_seed(0), shift=5)
    fa_bytes = saved_activation_bytes(model.train(), lambda: model(**batch).loss)
    lora = attach_lora(copy.deepcopy(base), LoraConfig(**LORA_FA), verbose=False).train()
    lora_bytes = saved_activation_bytes(lora, lambda: lora(**batch).loss)
    print(
        f"activations kept for backward (batch 32 x {demo.SEQ}): LoRA {lora_bytes / 1024:.0f} KiB, "
        f"LoRA-FA {fa_bytes / 1024:.0f} KiB ({1 - fa_bytes / lora_bytes:.0%} less)"
    )
    model.eval()
    return model, save_adapter(model, OUT_DIR / "lorafa", base_model_name_or_path="tiny-llama (random, seed 0)")


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    base = demo.build_base_model()
    ada_model, ada_dir = train_adalora(base)
    fa_model, fa_dir = train_lora_fa(base)
    base_onnx = demo.export_and_merge(ada_model, ada_dir, demo.example_inputs(3), OUT_DIR)
    adapters = {
        "adalora": (ada_model, ada_dir, demo.example_inputs(3)),
        "lorafa": (fa_model, fa_dir, demo.example_inputs(5)),
    }
    demo.inject_and_swap(base_onnx, adapters, OUT_DIR)
    for name, (_, path, _) in adapters.items():
        size = (path / "adapter_model.safetensors").stat().st_size
        print(f"{name}: adapter file {size / 1024:.1f} KiB, canonical ranks {load_adapter(path).summary()['ranks']}")
    print(f"\nvariants sample done in {time.perf_counter() - t0:.1f}s; files in {OUT_DIR}")


if __name__ == "__main__":
    main()

"""End-to-end demo: train a LoRA adapter in PyTorch, save it in PEFT's format, and reload it.

Stage 1 (training): a tiny LLaMA built from a config (random weights, fixed seed, no downloads) learns a
synthetic task — continue a sequence by adding 3 to every token, mod the vocabulary — through LoRA on
the attention projections only (q_proj, v_proj). Later stages take ``train_demo``'s results to ONNX.

Run: ``python samples/demo.py`` (about 20 s on two CPU cores).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_export import LoraConfig, attach_lora, load_adapter, lora_summary, save_adapter  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"
VOCAB = 32
SEQ = 12
SHIFT = 3
STEPS = 300
LOG_EVERY = 50


def build_base_model(seed: int = 0) -> torch.nn.Module:
    """A small LlamaForCausalLM standing in for a pretrained base model (eval mode, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        # Larger than the default 0.02 so the frozen head can express confident predictions.
        initializer_range=0.2,
        attn_implementation="eager",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def make_batch(gen: torch.Generator, batch: int = 32) -> dict[str, torch.Tensor]:
    """Sequences where each token is the previous one plus SHIFT (mod VOCAB), from a random start."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    ids = (start + SHIFT * torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def train_demo(out_dir: str | Path = OUT_DIR) -> tuple[torch.nn.Module, Path, dict[str, torch.Tensor]]:
    """Train LoRA on q_proj/v_proj, save the adapter to ``out_dir/adapter``, check that it reloads.

    Returns the trained (LoRA-wrapped, eval-mode) model, the adapter directory and example inputs.
    """
    out_dir = Path(out_dir)
    base = build_base_model()
    model = copy.deepcopy(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    attach_lora(model, config)

    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, STEPS + 1):
        loss = model(**make_batch(gen)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % LOG_EVERY == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    print(f"trained {STEPS} steps in {time.perf_counter() - t0:.1f}s; {lora_summary(model)['lora_layers']} LoRA layers")

    example = {"input_ids": make_batch(torch.Generator().manual_seed(1), batch=4)["input_ids"]}
    with torch.no_grad():
        base_acc = _accuracy(base, example["input_ids"])
        tuned_acc = _accuracy(model, example["input_ids"])
    print(f"next-token accuracy: base {base_acc:.0%} -> with LoRA {tuned_acc:.0%}")

    adapter_dir = save_adapter(model, out_dir / "adapter", base_model_name_or_path="tiny-llama (random, seed 0)")
    print(f"saved adapter to {adapter_dir}")
    check_reload(base, model, adapter_dir, example)
    return model, adapter_dir, example


def _accuracy(model: torch.nn.Module, ids: torch.Tensor) -> float:
    pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return (pred == ids[:, 1:]).float().mean().item()


def check_reload(base: torch.nn.Module, trained: torch.nn.Module, adapter_dir: Path, example: dict) -> None:
    """Attach the saved adapter to a fresh copy of the base model; its outputs must equal the trained model's."""
    reloaded = attach_lora(copy.deepcopy(base), load_adapter(adapter_dir), verbose=False).eval()
    with torch.no_grad():
        want = trained(**example).logits
        got = reloaded(**example).logits
    err = (got - want).abs().max().item()
    if err > 1e-5 * want.abs().max().item():
        raise SystemExit(f"reloaded adapter differs from the trained model: max abs error {err:.3g}")
    print(f"reloaded adapter matches the trained model (max abs error {err:.1e})")


def main() -> None:
    torch.set_num_threads(2)
    train_demo(OUT_DIR)


if __name__ == "__main__":
    main()

"""VeRA end to end: train λ vectors in PyTorch → export the base → merge → inject vector-only slots → serve.

A tiny LLaMA (from a config, no downloads) learns to continue a sequence by adding k to every token (mod
the vocabulary) through VeRA on q_proj/v_proj/o_proj: one frozen random pair A, B for the whole model, and
per layer only λ_d (r) and λ_b (out) train. Two adapters (k=3, k=5) over the same projection key are
merged (exact, plain LoRA math) and injected as vector-only slots: the graph holds A and B once, each
adapter file only its λ vectors. Every ONNX output is checked against the PyTorch VeRA model.

Run: ``python samples/vera.py`` (about a minute on 2 CPU cores). Outputs go to ``samples/out/vera/``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_export import LoraSession, VeraConfig, attach_lora, lora_summary, save_adapter  # noqa: E402
from lora_export.formats.safetensors import read_safetensors  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "vera"
VOCAB, SEQ, STEPS = 32, 12, 150
VERA = dict(r=64, target_modules=["q_proj", "v_proj", "o_proj"], projection_prng_key=0, d_initial=0.1)


def build_base_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(cfg).float().eval()


def build() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """For ``lora-export export samples/vera.py:build``: the base model and an example input."""
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    return build_base_model(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def train(shift: int) -> torch.nn.Module:
    model = attach_lora(build_base_model(), VeraConfig(**VERA), verbose=False)
    s = lora_summary(model)
    print(f"k={shift}: training {s['trainable']:,d} of {s['total']:,d} parameters (λ vectors only)")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    gen = torch.Generator().manual_seed(shift)
    model.train()
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (32, SEQ), generator=gen)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ((ids + shift) % VOCAB).reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == STEPS - 1:
            print(f"  step {step:3d}  loss {loss.item():.3f}")
    return model.eval()


def lora_export(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "lora_export", *map(str, args)], check=True)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))  # not the export's shape
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    reference = {}
    for name, shift in (("plus3", 3), ("plus5", 5)):
        model = train(shift)
        save_adapter(model, OUT / name)  # PEFT's VERA format: λ vectors + the shared projections
        with torch.no_grad():
            reference[name] = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.numpy()
        acc = (reference[name].argmax(-1) == (feeds["input_ids"] + shift) % VOCAB).mean()
        print(f"  accuracy on fresh tokens: {acc:.0%}")

    lora_export("export", f"{Path(__file__).resolve()}:build", OUT / "base.onnx")
    lora_export("merge", OUT / "base.onnx", OUT / "plus3", "-o", OUT / "merged-plus3.onnx")
    merged = ort.InferenceSession(str(OUT / "merged-plus3.onnx")).run(["logits"], feeds)[0]
    print(f"merged plus3 vs PyTorch: {_rel(merged, reference['plus3']):.1e}")

    lora_export("inject", OUT / "base.onnx", OUT / "plus3", OUT / "plus5", "-o", OUT / "served")
    sess = LoraSession(OUT / "served" / "model.onnx")
    for name in reference:
        sess.load_adapter(name, OUT / "served" / f"{name}.onnx_adapter")
        err = _rel(sess.run(["logits"], feeds, adapter=name)[0], reference[name])
        print(f"served {name} vs PyTorch: {err:.1e}")
        assert err < 1e-5
    lam = read_safetensors(OUT / "served" / "plus3.safetensors")[0]
    lam_bytes = sum(v.nbytes for v in lam.values())
    # What plain LoRA slots would hold for the same layers: A′ (in, r) and B′ (r, out) each.
    r = VERA["r"]
    lora_bytes = sum(4 * r * (64 + v.shape[0]) for k, v in lam.items() if k.endswith("vera_lambda_b"))
    print(
        f"adapter file: {len(lam)} λ tensors, {lam_bytes / 1024:.1f} kB (plain LoRA slots: {lora_bytes / 1024:.0f} kB)"
    )


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


if __name__ == "__main__":
    main()

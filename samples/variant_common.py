"""What the LoRA-variant samples share: a tiny LLaMA, a synthetic task, training, and the deployment check.

The task: continue a sequence by adding ``shift`` to every token (mod the vocabulary). ``deploy`` exports
the untouched base once (TorchScript), merges the adapter into it, injects it as swappable slots, and
compares both with the trained PyTorch model on fresh inputs.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_export import LoraSession, export, inject_files, load_adapter, merge_file  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
VOCAB, SEQ = 32, 12


def build_base(layers: int = 4) -> torch.nn.Module:
    """A small LlamaForCausalLM standing in for a pretrained base (random weights, seed 0, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


def batch(gen: torch.Generator, size: int = 16, shift: int = 3) -> dict[str, torch.Tensor]:
    start = torch.randint(0, VOCAB, (size, 1), generator=gen)
    ids = (start + shift * torch.arange(SEQ)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def train(model: torch.nn.Module, steps: int, lr: float = 1e-2, after_step=None, seed: int = 0) -> float:
    """AdamW on the trainable parameters; ``after_step()`` runs after each optimizer step. Returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch(gen)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step()
    model.eval()
    return loss.item()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def deploy(base: torch.nn.Module, adapter_dir: Path, trained: torch.nn.Module, work: Path) -> dict:
    """Export the base, merge and inject the adapter; errors of both against the trained PyTorch model."""
    work.mkdir(parents=True, exist_ok=True)
    ids = batch(torch.Generator().manual_seed(1), size=4)["input_ids"]
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base_onnx = export(copy.deepcopy(base), example, work / "base.onnx", dynamo=False)
    fresh = batch(torch.Generator().manual_seed(7), size=3)["input_ids"][:, :9]  # not the export's shape
    with torch.no_grad():
        ref = trained(input_ids=fresh, attention_mask=torch.ones_like(fresh)).logits.numpy()
    feeds = {"input_ids": fresh.numpy(), "attention_mask": np.ones_like(fresh.numpy())}
    merge_file(base_onnx, adapter_dir, work / "merged.onnx")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    merged = ort.InferenceSession(str(work / "merged.onnx"), so, providers=["CPUExecutionProvider"])
    merge_err = _rel(merged.run(None, feeds)[0], ref)
    result = inject_files(base_onnx, [adapter_dir], work / "served", names=["adapter"])
    sess = LoraSession(work / "served" / "model.onnx", providers=["CPUExecutionProvider"])
    sess.load_adapter("adapter", work / "served" / "adapter.onnx_adapter")
    inject_err = _rel(sess.run(["logits"], feeds, adapter="adapter")[0], ref)
    adapter = load_adapter(adapter_dir)
    figures = {
        "adapter file bytes": (Path(adapter_dir) / "adapter_model.safetensors").stat().st_size,
        "canonical ranks": sorted({t.rank for t in adapter}),
        "slot input pairs": len({(s.a, s.b) for s in result.manifest.slots.values()}),
        "merge vs PyTorch": f"{merge_err:.1e}",
        "inject vs PyTorch": f"{inject_err:.1e}",
    }
    assert merge_err < 1e-5 and inject_err < 1e-5, figures
    return figures


def accuracy(model: torch.nn.Module, shift: int = 3) -> float:
    ids = batch(torch.Generator().manual_seed(5), size=64, shift=shift)["input_ids"]
    with torch.no_grad():
        pred = model(input_ids=ids).logits.argmax(-1)
    return float((pred[:, :-1] == ids[:, 1:]).float().mean())


def show(title: str, figures: dict, t0: float) -> None:
    print(f"\n{title} ({time.perf_counter() - t0:.1f}s)")
    for k, v in figures.items():
        print(f"  {k}: {v}")

"""Inputs and references for benchmarks/genai_llama.py: the genai models' feeds (GroupQueryAttention takes the
past and present KV caches and derives positions from the attention mask), PyTorch outputs (PEFT and base)
on the same tokens, and the error measures."""

from __future__ import annotations

import numpy as np

SEQ = 128
VOCAB_LOW = 4  # skip the special tokens


def prompt_ids(batch: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(100 + batch).integers(VOCAB_LOW, vocab, (batch, SEQ), dtype=np.int64)


def decode_ids(batch: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(200 + batch).integers(VOCAB_LOW, vocab, (batch, 1), dtype=np.int64)


def feeds(inputs: list[str], phase: str, batch: int, present: dict | None, vocab: int, kv: tuple[int, int]) -> dict:
    """Feeds for the user inputs ``inputs`` of a genai decoder: a 128-token prompt with an empty past, or one
    token over the 128-token past that this variant's own prompt run returned (``present``)."""
    heads, head_dim = kv
    ids = prompt_ids(batch, vocab) if phase == "prompt" else decode_ids(batch, vocab)
    total = SEQ if phase == "prompt" else SEQ + 1
    out = {}
    for name in inputs:
        if name == "input_ids":
            out[name] = ids
        elif name == "attention_mask":
            out[name] = np.ones((batch, total), np.int64)
        elif name.startswith("past_key_values."):
            if phase == "prompt":
                out[name] = np.zeros((batch, heads, 0, head_dim), np.float32)
            else:
                out[name] = np.ascontiguousarray(present[name.replace("past_key_values.", "present.")])
        else:
            raise ValueError(f"no feed for input {name!r}")
    return out


def rel(out: np.ndarray, ref: np.ndarray) -> float:
    """max|out − ref| / max|ref|; only the positions both have (a model may return the last position only)."""
    n = min(out.shape[1], ref.shape[1])
    out, ref = out[:, -n:].astype(np.float64), ref[:, -n:].astype(np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def check(outs: dict[str, dict], ref: dict[str, np.ndarray], with_adapter: set[str]) -> dict[str, float]:
    """Per variant: logits vs PyTorch (PEFT for adapter variants, base otherwise); plus ONNX-to-ONNX pairs."""
    errors = {}
    for k, o in outs.items():
        errors[k] = rel(o["logits"], ref["peft" if k in with_adapter else "base"])
    for a, b in (("a", "c"), ("a", "e"), ("a", "d"), ("b", "base"), ("b2", "base"), ("d0", "base")):
        if a in outs and b in outs:
            errors[f"{a}_vs_{b}"] = rel(outs[a]["logits"], outs[b]["logits"])
    effect = ref["peft"] - ref["base"]
    errors["adapter_effect"] = rel(ref["peft"], ref["base"])  # how far the adapter moves the output
    if "base" in outs:
        # The adapter's effect as each variant reproduces it over its own base (for int4: beside quantization).
        for k in with_adapter & set(outs):
            errors[f"{k}_delta"] = rel(outs[k]["logits"] - outs["base"]["logits"], effect)
    return errors


def torch_references(hf, adapter, cells: list[tuple[str, int]], threads: int) -> dict[str, dict[str, np.ndarray]]:
    """PyTorch logits, with the PEFT adapter and without, for every cell (decode: past from the prompt)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32, attn_implementation="eager").eval()
    vocab = model.config.vocab_size
    pm = PeftModel.from_pretrained(model, adapter).eval()
    out: dict[str, dict[str, np.ndarray]] = {f"{p}_b{b}": {} for p, b in cells}
    for batch in sorted({b for _, b in cells}):
        ids = torch.from_numpy(prompt_ids(batch, vocab))
        new = torch.from_numpy(decode_ids(batch, vocab))
        for which in ("peft", "base"):
            with torch.no_grad():
                if which == "base":
                    with pm.disable_adapter():
                        first, second = _two_steps(pm, ids, new)
                else:
                    first, second = _two_steps(pm, ids, new)
            out[f"prompt_b{batch}"][which] = first
            out[f"decode_b{batch}"][which] = second
    return out


def _two_steps(model, ids, new) -> tuple[np.ndarray, np.ndarray]:
    import torch

    b = ids.shape[0]
    first = model(input_ids=ids, attention_mask=torch.ones(b, SEQ, dtype=torch.long), use_cache=True)
    second = model(
        input_ids=new,
        attention_mask=torch.ones(b, SEQ + 1, dtype=torch.long),
        past_key_values=first.past_key_values,
        use_cache=True,
    )
    return first.logits.float().numpy(), second.logits.float().numpy()

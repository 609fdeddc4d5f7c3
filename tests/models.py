"""Tiny deterministic models for tests: transformers models from small configs, and a custom conv/embedding net.

Each builder returns ``(model, make_inputs)``: the model in eval mode, float32, weights fixed by seed;
``make_inputs(seed)`` returns a fresh dict of inputs for ``model(**inputs)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VOCAB = 100
HIDDEN = 32
SEQ = 7
BATCH = 2

Builder = tuple[nn.Module, Callable[[int], dict]]


def _token_inputs(seed: int, with_type_ids: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0  # padding in one row exercises the attention mask
    out = {"input_ids": ids, "attention_mask": mask}
    if with_type_ids:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def _finish(model: nn.Module) -> nn.Module:
    return model.float().eval()


def tiny_bert(seed: int = 0) -> Builder:
    """BertModel, hidden 32, 2 layers, vocab 100."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _finish(BertModel(cfg)), lambda s: _token_inputs(s, with_type_ids=True)


def tiny_gpt2(seed: int = 0) -> Builder:
    """GPT2LMHeadModel (Conv1D c_attn/c_proj/c_fc: fan_in_fan_out), hidden 32, 2 layers, vocab 100."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _finish(GPT2LMHeadModel(cfg)), _token_inputs


def tiny_llama(seed: int = 0) -> Builder:
    """LlamaForCausalLM with grouped-query attention, hidden 32, 2 layers, vocab 100."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(cfg)), _token_inputs


class ConvEmbedNet(nn.Module):
    """Embedding → Conv2d → grouped Conv2d → Linear: every non-transformer LoRA target kind.

    Input ``ids`` (batch, 16) of token ids; the embeddings are laid out as a (dim, 4, 4) image.
    """

    def __init__(self, vocab: int = 50, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv = nn.Conv2d(dim, 8, kernel_size=3, padding=1)
        self.gconv = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=2)
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)  # (b, 16, dim)
        x = x.transpose(1, 2).reshape(ids.shape[0], -1, 4, 4)
        x = torch.relu(self.conv(x))
        x = self.gconv(x)
        return self.head(x.flatten(1))


def conv_embed_net(seed: int = 0) -> Builder:
    """ConvEmbedNet with fixed weights; inputs ``{"ids": (2, 16) token ids}``."""
    torch.manual_seed(seed)
    model = _finish(ConvEmbedNet())

    def make_inputs(s: int) -> dict:
        g = torch.Generator().manual_seed(s)
        return {"ids": torch.randint(0, 50, (BATCH, 16), generator=g)}

    return model, make_inputs


def randomize_lora(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every LoRA tensor (ours or PEFT's) random nonzero values: default init has B = 0, which
    would make any output comparison vacuous. DoRA magnitudes are perturbed around their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" not in name:
                continue
            noise = torch.randn(p.shape, generator=g) * std
            if "magnitude" in name:
                p.mul_(1 + noise.to(p.dtype))
            else:
                p.copy_(noise.to(p.dtype))


class _QV(nn.Module):
    def __init__(self, d_in: int, d_q: int, d_v: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_in, d_q, bias=False)
        self.v_proj = nn.Linear(d_in, d_v, bias=True)


class _QVModel(nn.Module):
    """``model.layers.0.self_attn.{q,v}_proj`` named as in LLaMA; the output concatenates both."""

    def __init__(self, d_in: int, d_q: int, d_v: int) -> None:
        super().__init__()
        self.model = nn.Module()
        layer = nn.Module()
        layer.self_attn = _QV(d_in, d_q, d_v)
        self.model.layers = nn.ModuleList([layer])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.model.layers[0].self_attn
        return torch.cat([attn.q_proj(x), attn.v_proj(x)], dim=-1)


def qv_model(d_in: int, d_q: int, d_v: int, seed: int = 0) -> nn.Module:
    """Two linear modules under LLaMA's names (q bias-free, v with a bias): the smallest model whose LoRA
    inputs other tools name after PEFT's module paths."""
    torch.manual_seed(seed)
    return _QVModel(d_in, d_q, d_v)

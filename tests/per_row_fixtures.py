"""Set-up for the per-row tests: a tiny LLaMA exported with its KV cache (past in, present out), PEFT
adapters of different ranks and targets, and PEFT's outputs for each row with that row's adapter alone."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

LAYERS, KV_HEADS, HEAD = 2, 2, 8  # tests/models.tiny_llama


class _WithPast(nn.Module):
    """input_ids, attention_mask, position_ids, past k/v per layer → logits, present k/v per layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(LAYERS):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for i in range(LAYERS):
            layer = out.past_key_values.layers[i]
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def past_names() -> list[str]:
    return [f"past.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]


def present_names() -> list[str]:
    return [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]


def step_inputs(batch: int, past_len: int, new: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens and a random past (fresh values, never zeros) for one step."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "input_ids": torch.randint(0, 100, (batch, new), generator=g),
        "attention_mask": torch.ones(batch, past_len + new, dtype=torch.int64),
        "position_ids": torch.arange(past_len, past_len + new).expand(batch, new).contiguous(),
    }
    for name in past_names():
        inputs[name] = torch.randn(batch, KV_HEADS, past_len, HEAD, generator=g)
    return inputs


def export_with_past(model: nn.Module, path: Path) -> Path:
    """TorchScript export of a deepcopy, batch/sequence/past dynamic."""
    example = step_inputs(2, 3, 2, seed=0)
    names = list(example)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}}
    dyn["position_ids"] = {0: "batch", 1: "seq"}
    dyn.update({n: {0: "batch", 2: "past"} for n in past_names()})
    dyn.update({n: {0: "batch", 2: "total"} for n in present_names()})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _WithPast(copy.deepcopy(model).eval()),
            tuple(example[n] for n in names),
            str(path),
            input_names=names,
            output_names=["logits", *present_names()],
            dynamic_axes=dyn,
            dynamo=False,
            opset_version=17,
        )
    return path


def torch_step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The model's logits and present k/v for one step, as numpy."""
    with torch.no_grad():
        outs = _WithPast(model)(*(inputs[n] for n in inputs))
    return [o.detach().numpy() for o in outs]


def feeds(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


def cli_run(*args) -> tuple[int, str, str]:
    """``lora-export ARGS`` in process: exit code, stdout, stderr."""
    from click.testing import CliRunner

    from lora_export.cli import cli

    res = CliRunner().invoke(cli, [*map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def cpu_session(path, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    """A plain ONNX Runtime CPU session (2 threads, quiet) over the model at ``path``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def saved_peft_adapters(root: Path, base: nn.Module, adapters: dict, seed: int) -> dict:
    """PEFT models on ``base`` with random nonzero LoRA weights (seeds from ``seed``), each saved to root/<name>."""
    from conftest import peft_reference

    peft = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (name, config) in enumerate(adapters.items()):
            peft[name] = peft_reference(base, seed=seed + i, **config)
            peft[name].save_pretrained(str(root / name))
    return peft


def hf_step(model: nn.Module, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
    """A Hugging Face causal LM (or PEFT model on one) for one step over ``past`` ([k0, v0, k1, v1, ...],
    post-RoPE as a cache holds them): logits and present k/v in that order, as numpy."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(len(past) // 2):
        cache.update(torch.from_numpy(past[2 * i]), torch.from_numpy(past[2 * i + 1]), i)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            past_key_values=cache,
            use_cache=True,
        )
    present = []
    for layer in out.past_key_values.layers:
        present += [layer.keys.numpy(), layer.values.numpy()]
    return [out.logits.numpy(), *present]


def check_rows(peft: dict, got: list[np.ndarray], step, rows, base_out: list[np.ndarray], tol: float = 1e-5) -> float:
    """Each row against ``hf_step`` of PEFT with that row's adapter alone (``step(i)``: that row's ids, mask
    and past); rows without adapter bit-identical to ``base_out``. Returns the largest relative error."""
    worst = 0.0
    for i, row in enumerate(rows):
        if row is None:
            for g, b in zip(got, base_out, strict=True):
                np.testing.assert_array_equal(g[i], b[i])
            continue
        ref = hf_step(peft[row], *step(i))
        assert rel(got[0][i], base_out[0][i]) > 1e-3, (i, row)  # the adapter changes the row: not vacuous
        for g, r in zip(got, ref, strict=True):
            err = rel(g[i], r[0])
            assert err <= tol, (i, row, err)
            worst = max(worst, err)
    return worst

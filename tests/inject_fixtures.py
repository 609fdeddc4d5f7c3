"""Shared set-up for the adapter-mode tests: tiny base models exported to ONNX, PEFT adapters with random
(nonzero) weights saved in PEFT's format, and PEFT's own outputs as references.

Each case is built once per test session: references are computed, then the base is exported from a
deepcopy, then the adapters are injected.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import output_of, peft_reference
from models import conv_embed_net, tiny_gpt2, tiny_llama
from torch import nn

from lora_export.graph.verbs.inject import inject_files

REF_SEED = 100  # fresh inputs, never the export example


class _Logits(nn.Module):
    """Export wrapper: plain tensors in, the first output out, no KV cache."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        kwargs = dict(zip(self.names, args))
        if hasattr(self.model, "config"):
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]


def export_base(model: nn.Module, inputs: dict, path: Path) -> Path:
    """TorchScript export of a deepcopy (fast; node names carry the module paths)."""
    names = list(inputs)
    dyn = {n: {0: "batch"} for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Logits(copy.deepcopy(model), names),
            tuple(inputs[n] for n in names),
            str(path),
            input_names=names,
            output_names=["output"],
            dynamic_axes=dyn,
            dynamo=False,
            opset_version=17,
        )
    # The wrapper adds a "model." scope; inject resolves through it, as it would for any wrapper.
    return path


def feeds_of(inputs: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


@dataclass
class Case:
    """One base model, its adapters, and PEFT's outputs on fresh inputs."""

    root: Path
    base_onnx: Path
    out_dir: Path
    feeds: dict[str, np.ndarray]
    base_ref: np.ndarray
    adapters: dict[str, Path] = field(default_factory=dict)
    refs: dict[str, np.ndarray] = field(default_factory=dict)
    make_inputs: object = None
    torch_base: nn.Module | None = None

    @property
    def model(self) -> Path:
        return self.out_dir / "model.onnx"


def build_case(root: Path, builder, adapters: dict[str, dict], inject: list[str] | None = None) -> Case:
    """Build references for every adapter, export the base, inject ``inject`` (default: all)."""
    root.mkdir(parents=True, exist_ok=True)
    base, make_inputs = builder()
    example, fresh = make_inputs(0), make_inputs(REF_SEED)
    case = Case(
        root=root,
        base_onnx=root / "base.onnx",
        out_dir=root / "injected",
        feeds=feeds_of(fresh),
        base_ref=output_of(base, fresh).numpy(),
        make_inputs=make_inputs,
        torch_base=base,
    )
    for i, (name, config) in enumerate(adapters.items()):
        peft_model = peft_reference(base, seed=10 + i, **config)
        case.refs[name] = output_of(peft_model, fresh).numpy()
        peft_model.save_pretrained(str(root / "peft" / name))
        # save_pretrained writes <dir>/ (adapter "default"); the directory name is the adapter's name.
        case.adapters[name] = root / "peft" / name
    export_base(base, example, case.base_onnx)
    names = inject if inject is not None else list(adapters)
    inject_files(case.base_onnx, [case.adapters[n] for n in names], case.out_dir)
    return case


LLAMA_ADAPTERS = {
    "a_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b_r8": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"]),
    "c_dora": dict(r=4, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"]),
    # Not injected: converted later for the injected model.
    "d_late": dict(r=2, lora_alpha=6, target_modules=["q_proj"]),
    "e_noslot": dict(r=2, lora_alpha=2, target_modules=["k_proj"]),
}


_CASES: dict[str, Case] = {}


def _cached(tmp_path_factory, key: str, *args, **kwargs) -> Case:
    # Test modules import these fixtures and pytest registers a copy per module: build once per session.
    if key not in _CASES:
        _CASES[key] = build_case(tmp_path_factory.mktemp(key), *args, **kwargs)
    return _CASES[key]


# Test modules import the ``*_fixture`` functions; the fixtures are named ``llama_case`` etc.
@pytest.fixture(scope="session", name="llama_case")
def llama_case_fixture(tmp_path_factory) -> Case:
    return _cached(tmp_path_factory, "llama", tiny_llama, LLAMA_ADAPTERS, inject=["a_r4", "b_r8", "c_dora"])


@pytest.fixture(scope="session", name="gpt2_case")
def gpt2_case_fixture(tmp_path_factory) -> Case:
    # GPT-2's Conv1D exports as Gemm with a bias: DoRA must keep the bias outside g's scaling.
    adapters = {
        "lora": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        "dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True),
    }
    return _cached(tmp_path_factory, "gpt2", tiny_gpt2, adapters)


@pytest.fixture(scope="session", name="conv_case")
def conv_case_fixture(tmp_path_factory) -> Case:
    adapters = {
        "all": dict(r=4, lora_alpha=8, target_modules=["emb", "conv", "gconv", "head"]),
        "dora": dict(r=2, lora_alpha=2, use_dora=True, target_modules=["emb", "conv", "head"]),
    }
    return _cached(tmp_path_factory, "conv", conv_embed_net, adapters)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())

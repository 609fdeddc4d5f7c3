"""``combine``: Σ wᵢ·ΔWᵢ as one PEFT adapter, checked against PEFT itself (its ``cat`` combination, its own
loading and delta weights) and an exact float64 sum; ``svd`` against numpy's SVD of the dense float64 sum."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import saved_peft_reference
from models import tiny_llama

from lora_export.cli import cli
from lora_export.core.combine import combine_adapters
from lora_export.formats.peft import load_adapter

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base():
    model, make_inputs = tiny_llama()
    return model


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Three PEFT adapters: plain, rsLoRA with rank/alpha patterns, and one with another target set."""
    root = tmp_path_factory.mktemp("combine")
    configs = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "o_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 2},
            alpha_pattern={"v_proj": 3},
        ),
        "c": dict(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"]),
    }
    paths = {}
    for i, (name, cfg) in enumerate(configs.items()):
        paths[name] = root / name
        torch.manual_seed(30 + i)
        saved_peft_reference(base, paths[name], seed=30 + i, **cfg)
    return paths


def _peft(base, path, name="default"):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), str(path), adapter_name=name).eval()


def _deltas(peft_model, name="default") -> dict[str, np.ndarray]:
    """ΔW per LoRA module as PEFT defines it (its own scaling), in float64."""
    out = {}
    for path, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            b = module.lora_B[name].weight.detach().double()
            a = module.lora_A[name].weight.detach().double()
            out[path] = ((b @ a) * module.scaling[name]).numpy()
    return out


def _run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res


def test_cat_is_the_exact_weighted_sum(base, adapters, tmp_path):
    weights = {"a": 0.7, "b": -1.3, "c": 2.0}
    res = _run("combine", adapters["a"], adapters["b"], adapters["c"], "--weights", "0.7,-1.3,2", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    want: dict[str, np.ndarray] = {}
    for n, w in weights.items():
        for path, d in _deltas(_peft(base, adapters[n])).items():
            want[path] = want.get(path, 0) + w * d
    got = _deltas(_peft(base, tmp_path / "o"))  # PEFT loads it, with its own scaling
    assert set(got) == set(want) and len(got) == 2 * (3 + 2)
    for path, d in want.items():
        assert np.abs(got[path] - d).max() <= 1e-6 * np.abs(d).max(), path
    ours = load_adapter(tmp_path / "o")
    assert ours.targets["model.layers.0.self_attn.q_proj"].rank == 4 + 8
    assert ours.targets["model.layers.1.self_attn.q_proj"].rank == 4 + 2
    assert ours.targets["model.layers.0.mlp.up_proj"].rank == 2


def test_cat_matches_peft_add_weighted_adapter(base, adapters, tmp_path):
    model = _peft(base, adapters["a"], "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(adapters["c"]), adapter_name="c")
        # PEFT's cat is exact for plain LoRA with positive weights (its √(w·s) split breaks on negative ones).
        model.add_weighted_adapter(["a", "c"], [0.6, 1.5], "mix", combination_type="cat")
    model.set_adapter("mix")
    _, make_inputs = tiny_llama()
    feeds = make_inputs(77)
    with torch.no_grad():
        want = model(**feeds).logits
    assert _run("combine", adapters["a"], adapters["c"], "--weights", "0.6,1.5", "-o", tmp_path / "o").exit_code == 0
    with torch.no_grad():
        got = _peft(base, tmp_path / "o")(**feeds).logits
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    peft_delta = _deltas(model, "mix")
    for path, d in _deltas(_peft(base, tmp_path / "o")).items():
        assert np.abs(peft_delta[path] - d).max() <= 1e-6 * np.abs(d).max()


def test_svd_truncation_reports_its_error(base, adapters, tmp_path):
    res = _run(
        "combine", adapters["a"], adapters["b"], "--weights", "1,-0.5", "--method", "svd", "--rank", "3",
        "-o", tmp_path / "o", "--json",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)["targets"]
    exact: dict[str, np.ndarray] = {}
    for n, w in (("a", 1.0), ("b", -0.5)):
        for path, d in _deltas(_peft(base, adapters[n])).items():
            exact[path] = exact.get(path, 0) + w * d
    got = _deltas(_peft(base, tmp_path / "o"))
    assert set(report) == set(exact) == set(got)
    for path, d in exact.items():
        s = np.linalg.svd(d, compute_uv=False)
        entry = report[path]
        assert entry["rank"] == 3
        assert entry["spectral_error"] == pytest.approx(s[3], rel=1e-9, abs=1e-12)
        assert entry["relative_error"] == pytest.approx(np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2)), rel=1e-9)
        residual = d - got[path]
        assert np.linalg.norm(residual, 2) == pytest.approx(s[3], rel=1e-4, abs=1e-6)
    # K at or above the sum's rank: nothing is lost.
    full = combine_adapters([load_adapter(adapters["a"])], method="svd", rank=64)
    assert all(e["spectral_error"] == 0.0 and e["relative_error"] < 1e-7 for e in full.targets.values())


def test_refusals_are_one_line(base, adapters, tmp_path):
    dora = tmp_path / "dora"
    saved_peft_reference(base, dora, r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"])
    from peft import VeraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "v")
    cases = [
        (["combine", adapters["a"], dora, "-o", tmp_path / "x"], "DoRA"),
        (["combine", tmp_path / "v", adapters["a"], "-o", tmp_path / "x"], "VeRA"),
        (["combine", adapters["a"], adapters["b"], "--weights", "1", "-o", tmp_path / "x"], "1 weight(s) for 2"),
        (["combine", adapters["a"], "--weights", "one", "-o", tmp_path / "x"], "--weights"),
        (["combine", adapters["a"], "--method", "svd", "-o", tmp_path / "x"], "--rank"),
        (["combine", adapters["a"], "--rank", "2", "-o", tmp_path / "x"], "svd only"),
        (["combine", adapters["a"], "-o", adapters["a"]], "overwrite"),
    ]
    for args, words in cases:
        res = CliRunner().invoke(cli, [str(a) for a in args])
        assert res.exit_code == 2, (args, res.output)
        lines = [line for line in res.output.splitlines() if line]
        assert len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "x").exists()

"""PiSSA / OLoRA adapters trained with PEFT: unconverted refused, converted by us or by PEFT exact on the
untouched base (merge, inject, PyTorch) against PEFT's output of the mutated model."""

from __future__ import annotations

import copy
import shutil
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from models import tiny_llama
from onnx_fixtures import export_onnx, run_onnx

from lora_export import ConfigError, LoraExportError, LoraSession, attach_lora, inject_files, load_adapter, merge_file
from lora_export.cli import cli
from lora_export.formats.safetensors import read_safetensors

TOL = 1e-5
INITS = ["pissa", "olora"]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("initconv")
    model, make_inputs = tiny_llama()
    onnx_path = export_onnx(model, make_inputs(0), root / "base.onnx", dynamo=False)
    return root, model, make_inputs, onnx_path


def _train_with_peft(model, make_inputs, init: str, root, peft_convert: bool = True, **extra):
    """PEFT with ``init`` on a copy of ``model``: initial adapter saved, 3 steps trained, saved both ways."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), config)
        peft_model.save_pretrained(str(root / "init"))
        opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(3):
            x = make_inputs(50 + step)
            logits = peft_model(**x).logits
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), (x["input_ids"] + 1) % 100)
            loss.backward()
            opt.step()
            opt.zero_grad()
        peft_model.eval()
        peft_model.save_pretrained(str(root / "trained"))
        shutil.copytree(root / "init", root / "init_copy")  # PEFT rewrites the initial adapter's config below
        if peft_convert:
            peft_model.save_pretrained(
                str(root / "peft_converted"), path_initial_model_for_weight_conversion=str(root / "init")
            )
    fresh = make_inputs(100)
    with torch.no_grad():
        ref = peft_model(**fresh).logits.numpy()
    return ref, fresh


@pytest.fixture(scope="module", params=INITS)
def trained(request, base, tmp_path_factory):
    root, model, make_inputs, onnx_path = base
    work = tmp_path_factory.mktemp(request.param)
    ref, fresh = _train_with_peft(model, make_inputs, request.param, work)
    with torch.no_grad():
        base_out = model(**fresh).logits.numpy()
    assert _rel(ref, base_out) > 1e-3, "vacuous: training changed nothing"
    return work, ref, fresh


def _check_exact(adapter_dir, model, onnx_path, ref, fresh, tmp):
    ours = attach_lora(copy.deepcopy(model), load_adapter(adapter_dir), verbose=False)
    with torch.no_grad():
        assert _rel(ours(**fresh).logits.numpy(), ref) <= TOL
    merged = merge_file(onnx_path, adapter_dir, tmp / "merged.onnx")
    assert merged is not None
    assert _rel(run_onnx(tmp / "merged.onnx", fresh), ref) <= TOL
    inject_files(onnx_path, [adapter_dir], tmp / "served", names=["a"])
    sess = LoraSession(tmp / "served" / "model.onnx", providers=["CPUExecutionProvider"])
    sess.load_adapter("a", tmp / "served" / "a.onnx_adapter")
    feeds = {k: v.numpy() for k, v in fresh.items()}
    assert _rel(sess.run(None, feeds, adapter="a")[0], ref) <= TOL


def test_unconverted_is_refused_in_one_line(trained, base, tmp_path):
    work, _, _ = trained
    root, _, _, onnx_path = base
    with pytest.raises(ConfigError, match="convert-init"):
        load_adapter(work / "trained")
    result = CliRunner().invoke(cli, ["merge", str(onnx_path), str(work / "trained"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "lora-export convert-init" in lines[0], result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_converted_by_us_is_exact(trained, base, tmp_path):
    work, ref, fresh = trained
    _, model, _, onnx_path = base
    out = tmp_path / "converted"
    result = CliRunner().invoke(
        cli, ["convert-init", str(work / "trained"), "--initial", str(work / "init_copy"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    adapter = load_adapter(out)
    assert {t.rank for t in adapter} == {8}
    # PEFT's conversion is the same concatenation: the tensors agree bit for bit.
    ours, peft = (
        read_safetensors(out / "adapter_model.safetensors")[0],
        read_safetensors(work / "peft_converted" / "adapter_model.safetensors")[0],
    )
    assert sorted(ours) == sorted(peft)
    assert all(np.array_equal(ours[k], peft[k]) for k in ours)
    _check_exact(out, model, onnx_path, ref, fresh, tmp_path)


def test_peft_converted_loads_and_is_exact(trained, base, tmp_path):
    work, ref, fresh = trained
    _, model, _, onnx_path = base
    _check_exact(work / "peft_converted", model, onnx_path, ref, fresh, tmp_path)


def test_initial_config_rewritten_by_peft_still_converts(trained, tmp_path):
    # After PEFT's own conversion the initial folder says init_lora_weights=true: still a valid A0, B0.
    work, _, _ = trained
    result = CliRunner().invoke(
        cli, ["convert-init", str(work / "trained"), "--initial", str(work / "init"), "-o", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output


def test_convert_init_refusals(trained, tmp_path):
    work, _, _ = trained
    # A plain adapter has nothing to convert; the initial adapter of another run does not fit.
    result = CliRunner().invoke(
        cli,
        ["convert-init", str(work / "peft_converted"), "--initial", str(work / "init_copy"), "-o", str(tmp_path / "c")],
    )
    assert result.exit_code == 2 and "nothing to convert" in result.stderr
    result = CliRunner().invoke(
        cli, ["convert-init", str(work / "trained"), "--initial", str(work / "trained"), "-o", str(work / "trained")]
    )
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert load_adapter  # the trained folder is untouched: still refused as unconverted below
    with pytest.raises(ConfigError):
        load_adapter(work / "trained")


@pytest.mark.parametrize("value", ["pissa_niter_4", "corda", "lora_ga", "loftq", "no-such-init"])
def test_other_base_mutating_inits_are_refused(trained, value, tmp_path):
    import json

    work, _, _ = trained
    shutil.copytree(work / "trained", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = value
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="init_lora_weights"):
        load_adapter(tmp_path / "a")


@pytest.mark.parametrize("value", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_keep_the_base_load_as_plain_lora(trained, value, tmp_path):
    import json

    work, _, _ = trained
    shutil.copytree(work / "peft_converted", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = value
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    assert len(load_adapter(tmp_path / "a")) == 4


def test_rslora_with_patterns_converts_exactly(base, tmp_path):
    # PEFT refuses to convert rsLoRA with rank/alpha patterns; doubling ranks and scaling alphas by √2 is exact.
    _, model, make_inputs, onnx_path = base
    extra = dict(use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3.0})
    ref, fresh = _train_with_peft(model, make_inputs, "pissa_niter_2", tmp_path, peft_convert=False, **extra)
    out = tmp_path / "converted"
    result = CliRunner().invoke(
        cli, ["convert-init", str(tmp_path / "trained"), "--initial", str(tmp_path / "init_copy"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert {t.rank for t in load_adapter(out)} == {4, 8}
    _check_exact(out, model, onnx_path, ref, fresh, tmp_path)


def test_dora_magnitude_carries_over(base, tmp_path):
    # DoRA normalises W_res + s·B·A, which is W + ΔW: the converted adapter keeps m and stays exact.
    _, model, make_inputs, onnx_path = base
    ref, fresh = _train_with_peft(model, make_inputs, "pissa", tmp_path, use_dora=True)
    out = tmp_path / "converted"
    result = CliRunner().invoke(
        cli, ["convert-init", str(tmp_path / "trained"), "--initial", str(tmp_path / "init_copy"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert load_adapter(out).is_dora
    _check_exact(out, model, onnx_path, ref, fresh, tmp_path)
    # PEFT's own conversion drops the magnitudes: refused, never merged without them.
    with pytest.raises(LoraExportError, match="lora_magnitude_vector"):
        load_adapter(tmp_path / "peft_converted")

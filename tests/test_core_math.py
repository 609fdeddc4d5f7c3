"""The pure pieces against independent references: ΔW and DoRA (plain PyTorch), config matching
(PEFT's own helpers), safetensors I/O (the safetensors library)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_export import LoraConfig, LoraTarget
from lora_export.core.delta import dora_scale, lora_delta, merged_weight
from lora_export.errors import ConfigError, ShapeError
from lora_export.formats.safetensors import read_safetensors, write_safetensors

rng = np.random.default_rng(1234)


def _rand(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_linear_delta_matches_torch_forward():
    t = LoraTarget("m", "linear", A=_rand(4, 7), B=_rand(5, 4), scale=0.5)
    x = torch.from_numpy(_rand(3, 7))
    lora_out = F.linear(F.linear(x, torch.from_numpy(t.A)), torch.from_numpy(t.B)) * 0.5
    merged_out = F.linear(x, torch.from_numpy(t.delta()))
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-5, atol=1e-5)


def test_embedding_delta_matches_torch_forward():
    t = LoraTarget("e", "embedding", A=_rand(3, 11), B=_rand(6, 3), scale=2.0)
    ids = torch.tensor([[1, 4, 10], [0, 7, 7]])
    lora_out = F.embedding(ids, torch.from_numpy(t.A.T)) @ torch.from_numpy(t.B.T) * 2.0
    merged_out = F.embedding(ids, torch.from_numpy(t.delta()))
    assert t.delta().shape == t.weight_shape == (11, 6)
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_delta_matches_two_convolutions(kernel):
    t = LoraTarget("c", "conv", A=_rand(4, 3, kernel, kernel), B=_rand(5, 4, 1, 1), scale=0.25)
    x = torch.from_numpy(_rand(2, 3, 9, 9))
    two_step = F.conv2d(F.conv2d(x, torch.from_numpy(t.A), padding=1), torch.from_numpy(t.B)) * 0.25
    one_step = F.conv2d(x, torch.from_numpy(t.delta()), padding=1)
    torch.testing.assert_close(one_step, two_step, rtol=1e-4, atol=1e-4)


def test_grouped_conv_delta_is_refused():
    t = LoraTarget("c", "conv", A=_rand(4, 4, 3, 3), B=_rand(6, 2, 1, 1), scale=1.0)
    assert t.groups == 2
    with pytest.raises(ShapeError, match="grouped convolution"):
        t.delta()


def test_dora_merge_matches_peft_formula_in_torch():
    t = LoraTarget("m", "linear", A=_rand(4, 7), B=_rand(5, 4), scale=0.5, magnitude=np.abs(_rand(5)) + 0.1)
    w0 = _rand(5, 7)
    # PEFT: W' = m / ||W0 + ΔW||_row * (W0 + ΔW)
    wt = torch.from_numpy(w0) + 0.5 * torch.from_numpy(t.B) @ torch.from_numpy(t.A)
    ref = (torch.from_numpy(t.magnitude) / torch.linalg.norm(wt, dim=1)).view(-1, 1) * wt
    np.testing.assert_allclose(merged_weight(w0, t), ref.numpy(), rtol=1e-5, atol=1e-6)
    g = dora_scale(w0, lora_delta(t), t.magnitude, "linear")
    assert g.shape == (5,)


def test_merged_weight_rejects_wrong_base_shape():
    t = LoraTarget("m", "linear", A=_rand(2, 7), B=_rand(5, 2), scale=1.0)
    with pytest.raises(ShapeError, match=r"\(5, 7\)"):
        merged_weight(_rand(7, 5), t)


def test_rank_disagreement_is_refused():
    with pytest.raises(ShapeError, match="ranks disagree"):
        LoraTarget("m", "linear", A=_rand(4, 7), B=_rand(5, 3), scale=1.0)


def test_config_matching_agrees_with_peft():
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.mlp.up_proj",
        "q_proj",
        "model.layers.10.self_attn.q_proj",
        "lm_head",
    ]
    specs = [["q_proj", "up_proj"], r".*\.layers\.1\..*", ["self_attn.q_proj"]]
    for spec in specs:
        ours = LoraConfig(target_modules=spec, exclude_modules=["layers.10.self_attn.q_proj"])
        theirs = PeftLoraConfig(target_modules=spec, exclude_modules=["layers.10.self_attn.q_proj"])
        for name in names:
            assert ours.is_target(name) == bool(check_target_module_exists(theirs, name)), (spec, name)
    patterns = {"q_proj": 4, r"layers\.1\..*": 2}
    cfg = LoraConfig(r=8, rank_pattern=patterns, lora_alpha=16, use_rslora=True)
    for name in names:
        key = get_pattern_key(list(patterns), name)
        assert cfg.rank_for(name) == patterns.get(key, 8)
        assert cfg.scale_for(name) == pytest.approx(16 / cfg.rank_for(name) ** 0.5)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ConfigError, match="regular expression"):
        LoraConfig(target_modules="(unclosed")
    with pytest.raises(ConfigError, match="bias"):
        LoraConfig(bias="some")


def test_peft_config_round_trip():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["v", "q"], use_dora=True, rank_pattern={"q": 2})
    back = LoraConfig.from_peft_dict(cfg.to_peft_dict())
    assert back == LoraConfig(r=4, lora_alpha=8.0, target_modules=["q", "v"], use_dora=True, rank_pattern={"q": 2})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_safetensors_round_trip_against_library(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    tensors = {"b": torch.randn(3, 4).to(dtype), "a": torch.randn(5).to(dtype)}
    save_file(tensors, tmp_path / "lib.safetensors")
    ours, _ = read_safetensors(tmp_path / "lib.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(ours[k].astype(np.float32), v.float().numpy())
    write_safetensors(tmp_path / "ours.safetensors", {k: np.array(v) for k, v in ours.items()})
    back = load_file(tmp_path / "ours.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == dtype
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)


def test_truncated_safetensors_is_refused(tmp_path):
    from lora_export.errors import AdapterError

    write_safetensors(tmp_path / "x.safetensors", {"a": _rand(64, 64)})
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated"):
        read_safetensors(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"garbage!garbage")
    with pytest.raises(AdapterError):
        read_safetensors(tmp_path / "y.safetensors")

"""Delta-LoRA: the trained weight is W₀ + λ·(B_T A_T − B_K A_K); the canonical adapter (rank ≤ 2r) merged
onto the untouched base equals the trained model's weight + LoRA, and merge/inject equal the trained model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import output_of
from models import tiny_llama
from onnx_fixtures import export_onnx, run_onnx

from lora_export import (
    ConfigError,
    LoraConfig,
    LoraSession,
    TargetError,
    attach_lora,
    inject_files,
    load_adapter,
    merge_file,
    remove_lora,
    save_adapter,
)
from lora_export.core.delta import merged_weight
from lora_export.training.attach import lora_layers
from lora_export.training.delta_lora import DeltaLora

TOL = 1e-5
LAM, K, T, R = 2.0, 2, 6, 4
# "Exact" for the weights: the trained W is rounded to float32 once per step, the merge once; both are within
# a few float32 roundings of the float64 value, so 1e-6 of the weight's size bounds their difference.
W_TOL = 1e-6


def _train(model, delta, make_inputs, steps, snapshots=None):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, steps + 1):
        x = make_inputs(30 + step)
        loss = torch.nn.functional.cross_entropy(model(**x).logits.transpose(1, 2), (x["input_ids"] + 1) % 100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        delta.step()
        if snapshots is not None and step == K:
            snapshots.update(
                {
                    n: (m.lora_A.detach().double().clone(), m.lora_B.detach().double().clone())
                    for n, m in lora_layers(model).items()
                }
            )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta")
    base, make_inputs = tiny_llama()
    onnx_path = export_onnx(base, make_inputs(0), root / "base.onnx", dynamo=False)
    model = attach_lora(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    w0 = {n: m.base_layer.weight.detach().double().clone() for n, m in lora_layers(model).items()}
    delta = DeltaLora(model, update_ratio=LAM, start_step=K)
    snaps: dict = {}
    _train(model.train(), delta, make_inputs, T, snaps)
    model.eval()
    delta.save(root / "delta")
    fresh = make_inputs(100)
    return dict(
        root=root, base=base, model=model, delta=delta, onnx=onnx_path, w0=w0, snaps=snaps, fresh=fresh,
        ref=output_of(model, fresh).numpy(), base_ref=output_of(base, fresh).numpy(),
    )  # fmt: skip


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_trained_weight_is_the_telescoped_sum(run):
    for name, layer in lora_layers(run["model"]).items():
        w = layer.base_layer.weight
        assert w.grad is None and not w.requires_grad  # W moves by the callback only
        a_k, b_k = run["snaps"][name]
        a_t, b_t = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        expected = run["w0"][name] + LAM * (b_t @ a_t - b_k @ a_k)
        assert _rel(w.detach(), expected) <= W_TOL
        assert _rel(w.detach(), run["w0"][name]) > 1e-4, "vacuous: W did not move"


def test_merged_weight_equals_trained_weight_plus_lora_at_rank_2r(run):
    adapter = run["delta"].adapter()
    merged_torch = remove_lora(copy.deepcopy(run["model"]))  # W_T + s·B_T A_T, folded by PyTorch-side merge
    for name, t in adapter.targets.items():
        assert t.rank == 2 * R and t.scale == 1.0
        assert np.linalg.matrix_rank(t.delta(np.float64)) <= 2 * R
        ours = merged_weight(run["w0"][name].numpy(), t, np.float64)
        trained = merged_torch.get_submodule(name).weight.detach().double().numpy()
        assert _rel(ours, trained) <= W_TOL


def test_saved_format_round_trips(run):
    loaded = load_adapter(run["root"] / "delta")
    assert loaded.digest() == run["delta"].adapter().digest()
    assert {t.rank for t in loaded} == {2 * R}


def test_merge_and_inject_equal_the_trained_model(run, tmp_path):
    assert _rel(run["ref"], run["base_ref"]) > 1e-3, "vacuous"
    merge_file(run["onnx"], run["root"] / "delta", tmp_path / "merged.onnx")
    assert _rel(run_onnx(tmp_path / "merged.onnx", run["fresh"]), run["ref"]) <= TOL
    inject_files(run["onnx"], [run["root"] / "delta"], tmp_path / "served", names=["d"])
    sess = LoraSession(tmp_path / "served" / "model.onnx", providers=["CPUExecutionProvider"])
    sess.load_adapter("d", tmp_path / "served" / "d.onnx_adapter")
    feeds = {k: v.numpy() for k, v in run["fresh"].items()}
    assert _rel(sess.run(None, feeds, adapter="d")[0], run["ref"]) <= TOL
    # The reloaded adapter on the untouched PyTorch base is the trained model too.
    again = attach_lora(copy.deepcopy(run["base"]), load_adapter(run["root"] / "delta"), verbose=False)
    assert _rel(output_of(again, run["fresh"]).numpy(), run["ref"]) <= TOL


def test_plain_save_of_a_moved_model_is_refused(run, tmp_path):
    with pytest.raises(TargetError, match="DeltaLora.save"):
        save_adapter(run["model"], tmp_path / "x")


def test_before_the_warm_up_ends_it_is_plain_lora(tmp_path):
    base, make_inputs = tiny_llama()
    model = attach_lora(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj"]), verbose=False)
    delta = DeltaLora(model, update_ratio=LAM, start_step=10)
    _train(model, delta, make_inputs, 2)
    assert {t.rank for t in delta.adapter()} == {R}
    save_adapter(model, tmp_path / "plain")  # W never moved: a plain save is fine


def test_dropout_is_refused():
    base, _ = tiny_llama()
    model = attach_lora(base, LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1), verbose=False)
    with pytest.raises(ConfigError, match="lora_dropout=0"):
        DeltaLora(model)

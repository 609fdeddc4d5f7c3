"""AdaLoRA against PEFT (the independent reference): layers, allocator, schedule, files both ways, ONNX stages.

PEFT trains an AdaLoRA adapter on a tiny model while our allocator sees the same weights and gradients
each step: budgets and pruning decisions must agree exactly. The adapters saved by either side load in
the other; PEFT's pruned adapter merges and injects (our exporter + CLI) to PEFT's own outputs.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_rel_close, output_of
from models import conv_embed_net, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

from lora_export import AdapterError, ConfigError, LoraSession, TargetError, attach_lora, load_adapter, save_adapter
from lora_export.cli import cli
from lora_export.core.adalora_config import AdaLoraConfig, adalora_scale, budget_schedule
from lora_export.exporting.exporter import export_with_manifest
from lora_export.formats.safetensors import read_safetensors
from lora_export.training.adalora import (
    AdaLoraLinear,
    RankAllocator,
    adalora_layers,
    attach_adalora,
    orth_regularization,
    prune_threshold,
    sensitivity_ema,
    triplet_importance,
)

MODELS = {
    "bert": (tiny_bert, ["query", "value", "dense"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),  # HF Conv1D: fan_in_fan_out
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
}
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10, lora_alpha=8)
CPU = ["CPUExecutionProvider"]


def peft_adalora(base, **cfg):
    from peft import AdaLoraConfig as PeftAdaLoraConfig
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), PeftAdaLoraConfig(**cfg))


def peft_from_pretrained(base, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def copy_from_peft(ours, ref, grads: bool = False) -> None:
    """Our AdaLoRA tensors (and gradients) := PEFT's, module by module."""
    inner = ref.base_model.model
    for path, layer in adalora_layers(ours).items():
        peft_layer = inner.get_submodule(path)
        for part in ("lora_A", "lora_B", "lora_E"):
            src, dst = getattr(peft_layer, part)["default"], getattr(layer, part)
            dst.data.copy_(src.data)
            if grads:
                dst.grad = src.grad.clone()


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 7), generator=g)
    return {"input_ids": ids, "labels": ids}


# -- the pure math -----------------------------------------------------------------------------------


def test_budget_schedule_is_peft_s():
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    for tinit, tfinal, total, delta in [(2, 2, 10, 1), (0, 0, 7, 1), (3, 5, 40, 4), (10, 20, 100, 3)]:
        peft = PeftAllocator.__new__(PeftAllocator)
        peft.peft_config = type("C", (), dict(tinit=tinit, tfinal=tfinal, total_step=total, deltaT=delta))()
        peft.init_bgt, peft.target_bgt = 36, 12
        for step in range(total + 2):
            ours = budget_schedule(
                step, init_bgt=36, target_bgt=12, tinit=tinit, tfinal=tfinal, total_step=total, deltaT=delta
            )
            assert ours == peft.budget_schedule(step), (tinit, tfinal, total, delta, step)
    # Cubic decay from init to target between tinit and total - tfinal; every deltaT-th step prunes.
    kw = dict(init_bgt=36, target_bgt=12, tinit=10, tfinal=20, total_step=100, deltaT=3)
    assert budget_schedule(10, **kw) == (36, False)
    assert budget_schedule(45, **kw) == (int(24 * (1 - 35 / 70) ** 3 + 12), True)
    assert budget_schedule(46, **kw)[1] is False
    assert budget_schedule(80, **kw) == (12, False) and budget_schedule(81, **kw) == (12, True)


def test_importance_math_by_hand():
    g = torch.Generator().manual_seed(0)
    p, grad = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    avg, unc = torch.rand(3, 4, generator=g), torch.rand(3, 4, generator=g)
    new_avg, new_unc = sensitivity_ema(p, grad, avg, unc, 0.8, 0.7)
    ipt = np.abs(p.numpy() * grad.numpy())
    want_avg = 0.8 * avg.numpy() + 0.2 * ipt
    np.testing.assert_allclose(new_avg.numpy(), want_avg, rtol=1e-6)
    np.testing.assert_allclose(new_unc.numpy(), 0.7 * unc.numpy() + 0.3 * np.abs(ipt - want_avg), rtol=1e-6)

    sa, se, sb = torch.rand(3, 5, generator=g), torch.rand(3, 1, generator=g), torch.rand(6, 3, generator=g)
    want = se.numpy()[:, 0] + sa.numpy().mean(1) + sb.numpy().mean(0)
    np.testing.assert_allclose(triplet_importance(sa, se, sb).numpy(), want, rtol=1e-6)
    scores = torch.tensor([0.5, 0.1, 0.3, 0.1, 0.9])
    assert prune_threshold(scores, 2) == pytest.approx(0.1)  # both 0.1s are cut: ties go together
    assert prune_threshold(scores, 3) == pytest.approx(0.3)
    assert adalora_scale(8, 6) == pytest.approx(8 / 6.00001, rel=1e-7)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(total_step=None), "total_step"),
        (dict(total_step=10, tinit=5, tfinal=5), "no pruning phase"),
        (dict(total_step=10, target_r=13), "must not exceed init_r"),
        (dict(total_step=10, beta1=1.0), "beta1"),
        (dict(total_step=10, lora_alpha=0), "lora_alpha must be positive"),
        (dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight"),
    ],
)
def test_config_refusals(fields, message):
    with pytest.raises(ConfigError, match=message):
        AdaLoraConfig(**fields)


# -- layers vs PEFT with identical weights ------------------------------------------------------------


@pytest.mark.parametrize("arch", MODELS)
def test_layers_match_peft(arch):
    build, targets = MODELS[arch]
    base, make_inputs = build()
    ref = peft_adalora(base, target_modules=targets, **SCHEDULE).eval()
    randomize_lora(ref, seed=3)  # E too: PEFT's init has E = 0, which would make the comparison vacuous
    ours = attach_adalora(copy.deepcopy(base), AdaLoraConfig(target_modules=targets, **SCHEDULE), verbose=False)
    copy_from_peft(ours, ref)
    assert set(adalora_layers(ours)) == {
        n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_E")
    }
    for seed in (1, 2):
        x = make_inputs(seed)
        expected = output_of(ref, x)
        assert (output_of(base, x) - expected).abs().max() > 1e-3
        assert_rel_close(output_of(ours.eval(), x), expected)
    # The canonical (compiled) adapter computes the same: attach it as plain LoRA layers.
    plain = attach_lora(copy.deepcopy(base), _adapter(ours), verbose=False).eval()
    assert_rel_close(output_of(plain, make_inputs(3)), output_of(ref, make_inputs(3)))


def _adapter(model):
    from lora_export import adapter_from_model

    return adapter_from_model(model)


def test_only_svd_tensors_train_and_conv_or_embedding_targets_are_refused():
    base, _ = tiny_llama()
    model = attach_adalora(base, AdaLoraConfig(target_modules=["q_proj"], **SCHEDULE), verbose=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and {n.rsplit(".", 1)[-1] for n in names} == {"lora_A", "lora_B", "lora_E"}
    layer = next(iter(adalora_layers(model).values()))
    assert isinstance(layer, AdaLoraLinear) and (layer.lora_E == 0).all() and (layer.lora_A != 0).all()
    emb, _ = tiny_llama()
    with pytest.raises(TargetError, match="Linear and Conv1D"):
        attach_adalora(emb, AdaLoraConfig(target_modules=["embed_tokens", "q_proj"], **SCHEDULE), verbose=False)
    assert not any(isinstance(m, AdaLoraLinear) for m in emb.modules())  # left as it was


# -- training: the allocator against PEFT's, step by step -----------------------------------------------


def _train_both(arch: str, root):
    """PEFT trains AdaLoRA; ours mirrors its weights and gradients each step and allocates alongside.

    Returns (base, PEFT model, our model, per-step records); both adapters saved under ``root``.
    """
    build, targets = MODELS[arch]
    base, _ = build()
    cfg = dict(target_modules=targets, **SCHEDULE)
    ref = peft_adalora(base, **cfg)
    ours = attach_adalora(copy.deepcopy(base), AdaLoraConfig(**cfg), verbose=False)
    allocator = RankAllocator(ours)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=2e-2)
    records = []
    for step in range(SCHEDULE["total_step"]):
        if step == 0:  # PEFT adds its orthogonality term to outputs.loss (eval: no dropout between the two)
            copy_from_peft(ours, ref)
            with torch.no_grad():
                ref.eval()
                added = ref.base_model(**batch(step)).loss - ref.base_model.model(**batch(step)).loss
            assert_rel_close(orth_regularization(ours).detach(), added, rel=1e-4)
        ref.train()
        loss = ref.base_model(**batch(step)).loss  # AdaLoraModel.forward: with the orthogonality term
        loss.backward()
        opt.step()
        copy_from_peft(ours, ref, grads=True)
        budget = allocator.update_and_allocate(step)
        ref.base_model.update_and_allocate(step)
        opt.zero_grad()
        peft_pattern = ref.peft_config["default"].rank_pattern or {}
        records.append(
            (step, budget, allocator.ranks(), {k.split(".lora_E")[0]: sum(v) for k, v in peft_pattern.items()})
        )
        for path, layer in adalora_layers(ours).items():
            peft_e = ref.base_model.model.get_submodule(path).lora_E["default"]
            assert torch.equal(layer.lora_E, peft_e), (step, path)  # same triplets zeroed
            if peft_pattern:
                assert layer.rank_mask.tolist() == peft_pattern[f"{path}.lora_E.default"], (step, path)
    save_adapter(ours, root / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(str(root / "peft"))
    return base, ref.eval(), ours.eval(), records


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"adalora-{request.param}")
    return (request.param, root, *_train_both(request.param, root))


def test_allocator_matches_peft_and_budget_reaches_target_on_schedule(trained):
    arch, _, _, _, ours, records = trained
    n = len(adalora_layers(ours))
    allocator = RankAllocator(ours)
    assert allocator.init_bgt == 6 * n and allocator.target_bgt == 2 * n
    for step, budget, ranks, peft_ranks in records:
        want, prune = allocator.budget(step)
        assert budget == want
        kept = sum(ranks.values())
        if step <= SCHEDULE["tinit"]:
            assert kept == 6 * n  # warm-up: nothing pruned
        elif prune:
            assert kept == budget  # no ties at the threshold on real scores
        assert {p: r for p, r in ranks.items()} == peft_ranks or step <= SCHEDULE["tinit"]
    final = records[-1][2]
    assert sum(final.values()) == 2 * n  # target_r on average ...
    assert len(set(final.values())) > 1  # ... spread unevenly, by importance


def test_ours_saved_loads_in_peft_with_identical_outputs(trained):
    arch, root, base, ref, ours, _ = trained
    ours_cfg = json.loads((root / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert ours_cfg["peft_type"] == "ADALORA"
    for key in ("rank_pattern", "init_r", "target_r", "tinit", "tfinal", "total_step", "lora_alpha", "fan_in_fan_out"):
        assert ours_cfg[key] == peft_cfg[key], key
    ours_t = read_safetensors(root / "ours" / "adapter_model.safetensors")[0]
    peft_t = read_safetensors(root / "peft" / "adapter_model.safetensors")[0]
    assert sorted(ours_t) == sorted(peft_t)
    for key in peft_t:
        np.testing.assert_array_equal(ours_t[key], peft_t[key], err_msg=key)
    loaded = peft_from_pretrained(base, root / "ours")
    x = batch(50)
    del x["labels"]
    assert_rel_close(output_of(loaded, x), output_of(ours, x))
    assert_rel_close(output_of(loaded, x), output_of(ref, x))


def _surviving(root) -> dict[str, int]:
    pattern = json.loads((root / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    return {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}


def test_peft_saved_loads_here_with_surviving_ranks(trained):
    arch, root, base, _, ours, _ = trained
    surviving = _surviving(root)
    assert 0 in surviving.values()  # a target pruned away entirely: left out of the canonical adapter
    adapter = load_adapter(root / "peft")
    assert {p: t.rank for p, t in adapter.targets.items()} == {p: r for p, r in surviving.items() if r}
    assert all(t.scale == adalora_scale(8, 6) for t in adapter.targets.values())
    assert adapter.digest() == _adapter(ours).digest()  # the same compiled adapter, from file or from training
    reference = peft_from_pretrained(base, root / "peft")
    plain = attach_lora(copy.deepcopy(base), adapter, verbose=False).eval()
    x = batch(51)
    del x["labels"]
    assert (output_of(base, x) - output_of(reference, x)).abs().max() > 1e-4
    assert_rel_close(output_of(plain, x), output_of(reference, x))


def test_peft_saved_merges_and_injects_to_peft_outputs(trained):
    arch, root, base, _, _, _ = trained
    x = batch(52)
    del x["labels"]
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    export_with_manifest(base, x, root / "base.onnx", dynamo=False)
    runner = CliRunner()
    res = runner.invoke(cli, ["merge", str(root / "base.onnx"), str(root / "peft"), "-o", str(root / "merged.onnx")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["inject", str(root / "base.onnx"), f"ada={root / 'peft'}", "-o", str(root / "served")])
    assert res.exit_code == 0, res.output

    expected = output_of(peft_from_pretrained(base, root / "peft"), x).numpy()
    feeds = {k: v.numpy() for k, v in x.items()}
    merged = ort.InferenceSession(str(root / "merged.onnx"), providers=CPU).run(["logits"], feeds)[0]
    sess = LoraSession(root / "served" / "model.onnx", providers=CPU)
    sess.load_adapter("ada", root / "served" / "ada.onnx_adapter")
    injected = sess.run(["logits"], feeds, adapter="ada")[0]
    for got in (merged, injected):
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # Slots hold each target's surviving rank; a target pruned to rank 0 has no slot at all.
    slots = read_safetensors(root / "served" / "ada.safetensors")[0]
    ranks = {k.removesuffix(".lora_A"): v.shape[1] for k, v in slots.items() if k.endswith(".lora_A")}
    assert ranks == {p: r for p, r in _surviving(root).items() if r}


# -- loader refusals ---------------------------------------------------------------------------------


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_loader_refusals(trained, tmp_path):
    _, root, *_ = trained
    pattern = json.loads((root / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    first = sorted(pattern)[0]
    flipped = {**pattern, first: [not f for f in pattern[first]]}
    cases = [
        (dict(rank_pattern=flipped), AdapterError, "adapter_config.json keeps"),
        (dict(rank_pattern={first: [1] * 6}), ConfigError, "booleans"),
        (dict(rank_pattern={"q_proj": [True] * 6}), ConfigError, "not <module>.lora_E"),
        (dict(lora_alpha=0), ConfigError, "lora_alpha <= 0"),
        (dict(use_dora=True), ConfigError, "DoRA"),
        (dict(rank_pattern=None), AdapterError, "keeps 6"),
    ]
    for i, (changes, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            load_adapter(_edit_config(root / "peft", tmp_path / str(i), **changes))


def test_gradients_and_own_training_run_match_peft_s_schedule():
    """Our layers' gradients are PEFT's; trained on their own, the budget reaches target_r on schedule."""
    base, _ = tiny_llama()
    targets = MODELS["llama"][1]
    ref = peft_adalora(base, target_modules=targets, **SCHEDULE)
    randomize_lora(ref, seed=5)
    ours = attach_adalora(copy.deepcopy(base), AdaLoraConfig(target_modules=targets, **SCHEDULE), verbose=False)
    copy_from_peft(ours, ref)
    ref.base_model(**batch(0)).loss.backward()
    (ours(**batch(0)).loss + orth_regularization(ours)).backward()
    for path, layer in adalora_layers(ours).items():
        peft_layer = ref.base_model.model.get_submodule(path)
        for part in ("lora_A", "lora_B", "lora_E"):
            assert_rel_close(getattr(layer, part).grad, getattr(peft_layer, part)["default"].grad)

    model = attach_adalora(copy.deepcopy(base), AdaLoraConfig(target_modules=targets, **SCHEDULE), verbose=False)
    allocator = RankAllocator(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(SCHEDULE["total_step"]):
        (model(**batch(step)).loss + orth_regularization(model)).backward()
        opt.step()
        budget = allocator.update_and_allocate(step)
        opt.zero_grad()
        want, prune = allocator.budget(step)
        assert budget == want
        if prune or step == SCHEDULE["total_step"] - SCHEDULE["tfinal"]:
            assert sum(allocator.ranks().values()) == budget, step
    assert sum(allocator.ranks().values()) == 2 * len(targets) * 2  # target_r x 6 targets
    for layer in adalora_layers(model).values():
        assert (layer.lora_E[~layer.rank_mask] == 0).all()


def test_conv2d_adalora_is_refused_not_misread(tmp_path):
    """PEFT's Conv2d AdaLoRA stores A flattened (r, in·k·k): it cannot be told from a Linear's, so every stage
    refuses it by shape rather than guess a kernel layout."""
    from lora_export import ShapeError

    base, make_inputs = conv_embed_net()
    ref = peft_adalora(base, target_modules=["conv"], init_r=4, target_r=2, total_step=10, tinit=1, tfinal=1)
    randomize_lora(ref, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(str(tmp_path / "conv"))
    adapter = load_adapter(tmp_path / "conv")
    with pytest.raises(ShapeError):
        attach_lora(copy.deepcopy(base), adapter, verbose=False)
    export_with_manifest(base, make_inputs(0), tmp_path / "base.onnx", dynamo=False)
    runner = CliRunner()
    merge = runner.invoke(
        cli, ["merge", str(tmp_path / "base.onnx"), str(tmp_path / "conv"), "-o", str(tmp_path / "m.onnx")]
    )
    inject = runner.invoke(
        cli, ["inject", str(tmp_path / "base.onnx"), str(tmp_path / "conv"), "-o", str(tmp_path / "s")]
    )
    for res in (merge, inject):
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "m.onnx").exists()

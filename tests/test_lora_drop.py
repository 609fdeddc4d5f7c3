"""LoRA-drop: the kept modules are the ones its importance ranks highest, the rest share one LoRA — one
tensor pair in the file, one pair of slot inputs in the injected model — and merge, inject and convert
equal the trained PyTorch model."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import output_of
from models import _token_inputs, randomize_lora
from onnx_fixtures import export_onnx, run_onnx

from lora_export import (
    LoraConfig,
    LoraSession,
    ShapeError,
    TargetError,
    attach_lora,
    convert_adapter,
    inject_files,
    load_adapter,
    merge_file,
    save_adapter,
)
from lora_export.formats.adapter_files import read_adapter_tensors
from lora_export.formats.safetensors import read_safetensors
from lora_export.graph.model.slot_manifest import SLOTS_KEY
from lora_export.training.lora_drop import apply_lora_drop, lora_importance, select_kept

TOL = 1e-5
Q = "model.layers.{}.self_attn.q_proj"
V = "model.layers.{}.self_attn.v_proj"
# Importance by construction: these B factors make the order within each module type known.
BOOST = {Q.format(2): 30.0, Q.format(0): 10.0, V.format(3): 30.0, V.format(1): 10.0}
KEPT = set(BOOST)
SHARED = {frozenset({Q.format(1), Q.format(3)}), frozenset({V.format(0), V.format(2)})}


def _llama4():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


def _independent_importance(model, layers, batches) -> dict[str, float]:
    """Σ‖x·(s·B·A)ᵀ‖² from the base layers' inputs, in float64 numpy."""
    seen: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    hooks = [
        layer.base_layer.register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach().double().numpy()))
        for n, layer in layers.items()
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    out = {}
    for n, layer in layers.items():
        delta = layer.scale * (layer.lora_B.detach().double().numpy() @ layer.lora_A.detach().double().numpy())
        out[n] = float(sum(np.sum((x @ delta.T) ** 2) for x in seen[n]))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_drop")
    base = _llama4()
    onnx_path = export_onnx(base, _token_inputs(0), root / "base.onnx", dynamo=False)
    model = attach_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=3)  # stands in for the warm-up
    from lora_export.training.attach import lora_layers

    layers = lora_layers(model)
    with torch.no_grad():
        for name, factor in BOOST.items():
            layers[name].lora_B.mul_(factor)
    sample = [_token_inputs(s) for s in (1, 2, 3)]
    importance = lora_importance(model, sample)
    reference = _independent_importance(model, layers, sample)
    plan = apply_lora_drop(model, importance, threshold=0.95)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(4):
        x = _token_inputs(20 + step)
        loss = torch.nn.functional.cross_entropy(model(**x).logits.transpose(1, 2), (x["input_ids"] + 1) % 100)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_adapter(model, root / "drop")
    fresh = _token_inputs(100)
    return dict(
        root=root,
        base=base,
        model=model,
        onnx=onnx_path,
        plan=plan,
        importance=importance,
        reference=reference,
        fresh=fresh,
        ref=output_of(model, fresh).numpy(),
        base_ref=output_of(base, fresh).numpy(),
    )


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_importance_is_the_lora_output_norm(trained):
    ours, ref = trained["importance"], trained["reference"]
    assert set(ours) == set(ref) and len(ours) == 8
    for name in ours:
        assert ours[name] == pytest.approx(ref[name], rel=1e-6)


def test_keeps_the_top_ranked_and_shares_the_rest(trained):
    plan, ref = trained["plan"], trained["reference"]
    assert set(plan.kept) == KEPT
    assert {frozenset(ms) for ms in plan.shared.values()} == SHARED
    # The kept set is exactly the cumulative-threshold selection over the independent importance.
    for kind in (Q, V):
        group = {kind.format(i): ref[kind.format(i)] for i in range(4)}
        assert set(select_kept(group, 0.95)) == KEPT & set(group)
    model = trained["model"]
    for members in plan.shared.values():
        first, *rest = (model.get_submodule(m) for m in members)
        assert all(m.lora_A is first.lora_A and m.lora_B is first.lora_B for m in rest)
        assert first.lora_B.abs().max() > 0  # trained after the drop (it started at B = 0)


def test_file_holds_each_shared_lora_once(trained):
    folder = trained["root"] / "drop"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA_DROP"
    assert {frozenset(ms) for ms in cfg["shared_groups"].values()} == SHARED
    tensors = read_safetensors(folder / "adapter_model.safetensors")[0]
    assert len(tensors) == 2 * len(KEPT) + 2 * len(SHARED)
    for group in cfg["shared_groups"]:
        assert f"{group}.lora_A.weight" in tensors and f"{group}.lora_B.weight" in tensors
    adapter = load_adapter(folder)
    assert len(adapter) == 8 and {frozenset(ms) for ms in adapter.shared.values()} == SHARED


def test_reloaded_adapter_equals_the_trained_model(trained):
    assert _rel(trained["ref"], trained["base_ref"]) > 1e-3, "vacuous: the adapter changes nothing"
    again = attach_lora(copy.deepcopy(trained["base"]), load_adapter(trained["root"] / "drop"), verbose=False)
    assert _rel(output_of(again, trained["fresh"]).numpy(), trained["ref"]) <= TOL
    # Training the reloaded model keeps the groups shared.
    group = next(iter(load_adapter(trained["root"] / "drop").shared.values()))
    assert again.get_submodule(group[0]).lora_A is again.get_submodule(group[1]).lora_A


def test_merge_equals_the_trained_model(trained, tmp_path):
    merge_file(trained["onnx"], trained["root"] / "drop", tmp_path / "merged.onnx")
    assert _rel(run_onnx(tmp_path / "merged.onnx", trained["fresh"]), trained["ref"]) <= TOL


def test_inject_gives_shared_modules_one_slot_pair(trained, tmp_path):
    out = tmp_path / "served"
    inject_files(trained["onnx"], [trained["root"] / "drop"], out, names=["drop"])
    model = onnx.load(str(out / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    slots = {s["module"]: s for s in json.loads(meta[SLOTS_KEY])["slots"]}
    assert len(slots) == 8
    for members in SHARED:
        assert len({(slots[m]["a"], slots[m]["b"]) for m in members}) == 1
    pairs = {(s["a"], s["b"]) for s in slots.values()}
    assert len(pairs) == len(KEPT) + len(SHARED)
    lora_inputs = [i.name for i in model.graph.input if i.name.endswith((".lora_A", ".lora_B"))]
    assert len(lora_inputs) == 2 * len(pairs)
    tensors = read_adapter_tensors(out / "drop.onnx_adapter")
    assert len(tensors) == 2 * len(pairs)

    feeds = {k: v.numpy() for k, v in trained["fresh"].items()}
    sess = LoraSession(out / "model.onnx", providers=["CPUExecutionProvider"], base_session=True)
    sess.load_adapter("drop", out / "drop.onnx_adapter")
    assert _rel(sess.run(None, feeds, adapter="drop")[0], trained["ref"]) <= TOL
    assert _rel(sess.run(None, feeds)[0], trained["base_ref"]) <= TOL  # the twin with shared branches stripped
    plain = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ad = ort.LoraAdapter()
    ad.Load(str(out / "drop.onnx_adapter"))
    ro = ort.RunOptions()
    ro.add_active_adapter(ad)
    assert _rel(plain.run(None, feeds, ro)[0], trained["ref"]) <= TOL

    # convert writes each shared pair once; adapters that do not share the same way are refused.
    report = convert_adapter(trained["root"] / "drop", out / "model.onnx", tmp_path / "again.onnx_adapter")
    assert report["tensors"] == 2 * len(pairs)
    plain_adapter = attach_lora(copy.deepcopy(trained["base"]), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_lora(plain_adapter, seed=9)
    save_adapter(plain_adapter, tmp_path / "plain")
    with pytest.raises(ShapeError, match="share one LoRA slot"):
        convert_adapter(tmp_path / "plain", out / "model.onnx", tmp_path / "p.onnx_adapter")
    with pytest.raises(TargetError, match="serves 2 modules together"):
        convert_adapter(
            tmp_path / "plain", out / "model.onnx", tmp_path / "p.onnx_adapter", only_targets=r"layers\.1\."
        )


def test_inject_beside_a_plain_adapter_keeps_own_slots(trained, tmp_path):
    # A plain adapter on the same modules: slots cannot be shared, both adapters still serve exactly.
    plain = attach_lora(copy.deepcopy(trained["base"]), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_lora(plain, seed=5)
    plain_ref = output_of(plain, trained["fresh"]).numpy()
    save_adapter(plain, tmp_path / "plain")
    out = tmp_path / "served"
    inject_files(trained["onnx"], [trained["root"] / "drop", tmp_path / "plain"], out, names=["drop", "plain"])
    sess = LoraSession(out / "model.onnx", providers=["CPUExecutionProvider"])
    assert all(not s.shared for s in sess.slots.values())
    feeds = {k: v.numpy() for k, v in trained["fresh"].items()}
    sess.load_adapter("drop", out / "drop.onnx_adapter")
    sess.load_adapter("plain", out / "plain.onnx_adapter")
    assert _rel(sess.run(None, feeds, adapter="drop")[0], trained["ref"]) <= TOL
    assert _rel(sess.run(None, feeds, adapter="plain")[0], plain_ref) <= TOL


def test_corrupt_sharing_in_slot_metadata_is_refused():
    from lora_export import ModelError
    from lora_export.graph.model.slot_manifest import Slot, SlotManifest

    def slot(module, shape):
        return Slot(module, "linear", "MatMul", f"n_{module}", f"w_{module}", shape, "float32", "g.lora_A", "g.lora_B")

    good = SlotManifest({"x": slot("x", [4, 8]), "y": slot("y", [4, 8])})
    assert SlotManifest.from_json(good.to_json()).sharing() == {"g.lora_A": ["x", "y"]}
    assert good.slots["x"].rank_dim == "g.rank" and good.slots["x"].shared
    bad = SlotManifest({"x": slot("x", [4, 8]), "y": slot("y", [4, 6])})
    with pytest.raises(ModelError, match="share"):
        SlotManifest.from_json(bad.to_json())


def test_half_shared_parameters_are_refused(tmp_path):
    model = attach_lora(_llama4(), LoraConfig(r=2, target_modules=["q_proj"]), verbose=False)
    a, b = model.get_submodule(Q.format(0)), model.get_submodule(Q.format(1))
    b.lora_A = a.lora_A  # A shared, B not: no format holds that
    with pytest.raises(TargetError, match="share lora_A but not lora_B"):
        save_adapter(model, tmp_path / "x")

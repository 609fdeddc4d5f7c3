"""Issue 14, item 7: clean one-line refusals where a traceback, a RecursionError or a silent exit 0 was.
Every CLI case runs in a temp folder; outputs are checked against plain numpy (``polish_fixtures``)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from polish_fixtures import one_error_line, reference, run_cli, with_metadata
from robust_fixtures import IN, OUT, VOCAB, write_adapter, write_model
from safetensors.numpy import load_file, save_file

from lora_export import Adapter, AdapterError, LoraConfig, LoraSession, LoraTarget, ModelError, safejson
from lora_export.graph.model.slot_manifest import SLOTS_KEY


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def served(tmp_path):
    """An injected tiny model in tmp/out (adapter ``ad``), its base and its PEFT adapter."""
    model, adapter = write_model(tmp_path / "m" / "model.onnx"), write_adapter(tmp_path / "ad")
    res = run_cli("inject", model, adapter, "-o", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return tmp_path, model, adapter


def _served_output(model_path, adapter_file, ids):
    sess = LoraSession(model_path, providers=["CPUExecutionProvider"])
    sess.load_adapter("a", adapter_file)
    return sess.run(["y"], {"ids": ids}, adapter="a")[0]


# -- deeply nested JSON ----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [700, 100_000])
def test_deep_inject_record_is_ignored_as_unreadable(served, depth):
    root, model, adapter = served
    (root / "out" / ".lora-export.json").write_text(_nested(depth))
    (root / "out" / "keep.txt").write_text("mine")
    res = run_cli("inject", model, f"x={adapter}", "-o", "out", cwd=root)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    # Unreadable: nothing of the earlier run is known to be ours, so nothing is removed; the new record is sound.
    assert (root / "out" / "ad.onnx_adapter").is_file() and (root / "out" / "keep.txt").read_text() == "mine"
    record = json.loads((root / "out" / ".lora-export.json").read_text())
    assert "x.onnx_adapter" in record["files"] and "keep.txt" not in record["files"]
    ids = np.random.default_rng(7).integers(0, VOCAB, 3)
    got = _served_output(root / "out" / "model.onnx", root / "out" / "x.onnx_adapter", ids)
    np.testing.assert_allclose(got, reference(ids, adapter), rtol=1e-5, atol=1e-5)


def test_deep_but_valid_genai_config_is_carried_over(tmp_path):
    model, adapter = write_model(tmp_path / "m" / "model.onnx"), write_adapter(tmp_path / "ad")
    deep = json.loads(_nested(600))
    config = {"model": {"decoder": {"filename": "model.onnx"}, "search": deep}}
    (tmp_path / "m" / "genai_config.json").write_text(json.dumps(config))
    res = run_cli("inject", model, adapter, "-o", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "genai_config.json").read_text()) == config
    res = run_cli("merge", model, adapter, "-o", "merged.onnx", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ids = np.random.default_rng(3).integers(0, VOCAB, 3)
    got = _served_output(tmp_path / "out" / "model.onnx", tmp_path / "out" / "ad.onnx_adapter", ids)
    np.testing.assert_allclose(got, reference(ids, adapter), rtol=1e-5, atol=1e-5)


def test_too_deep_genai_config_is_one_line(tmp_path):
    model, adapter = write_model(tmp_path / "m" / "model.onnx"), write_adapter(tmp_path / "ad")
    (tmp_path / "m" / "genai_config.json").write_text(
        '{"model": {"filename": "model.onnx", "x": ' + _nested(50_000) + "}}"
    )
    line = one_error_line(run_cli("inject", model, adapter, "-o", "out", cwd=tmp_path))
    assert "genai_config.json" in line and "nested too deeply" in line
    assert not (tmp_path / "out").exists()


def test_nesting_limit_does_not_depend_on_the_call_stack():
    def at_depth(n, fn):
        return at_depth(n - 1, fn) if n else fn()

    limit = sys.getrecursionlimit()
    text = _nested(safejson.MAX_DEPTH)
    # Deep in the stack, a document of MAX_DEPTH levels still parses and writes back unchanged.
    value = at_depth(limit - 60, lambda: safejson.loads(text))
    assert at_depth(limit - 60, lambda: safejson.dumps(value)) == text
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        safejson.loads(_nested(20 * safejson.MAX_DEPTH))
    assert sys.getrecursionlimit() == limit


# -- convert-init: finiteness -------------------------------------------------------------------


def _init_pair(root, poison: str | None):
    """A PiSSA-initialised adapter pair (trained, initial) in PEFT's format; ``poison``: a key set to NaN."""
    trained, initial = write_adapter(root / "trained", b_value=0.3), write_adapter(root / "initial", b_value=0.1)
    for d in (trained, initial):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["init_lora_weights"] = "pissa"
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    if poison:
        tensors = load_file(str(trained / "adapter_model.safetensors"))
        tensors[poison] = tensors[poison].copy()
        tensors[poison].flat[1] = np.inf if "lora_A" in poison else np.nan
        save_file(tensors, str(trained / "adapter_model.safetensors"))
    return trained, initial


def _delta(folder, module, parts):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    t = {k: v.astype(np.float64) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    a, b = (t[f"base_model.model.{module}.{p}"] for p in parts)
    return cfg["lora_alpha"] / cfg["r"] * (b @ a)


def test_convert_init_converts_finite_adapters(tmp_path):
    trained, initial = _init_pair(tmp_path, None)
    res = run_cli("convert-init", trained, "--initial", initial, "-o", "conv", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # Plain LoRA for the untouched base: ΔW = s·(B·A − B0·A0) on every target.
    for module, parts in (
        ("fc", ("lora_A.weight", "lora_B.weight")),
        ("emb", ("lora_embedding_A", "lora_embedding_B")),
    ):
        want = _delta(trained, module, parts) - _delta(initial, module, parts)
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(_delta(tmp_path / "conv", module, parts), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("key", ["base_model.model.fc.lora_B.weight", "base_model.model.emb.lora_embedding_A"])
def test_convert_init_refuses_nan_and_inf(tmp_path, key):
    trained, initial = _init_pair(tmp_path, key)
    line = one_error_line(run_cli("convert-init", trained, "--initial", initial, "-o", "conv", cwd=tmp_path))
    assert "NaN or Inf" in line and "trained" in line
    assert not (tmp_path / "conv").exists()


# -- verify --provider ----------------------------------------------------------------------------


def test_verify_refuses_an_unknown_provider_listing_the_available(tmp_path):
    import onnxruntime as ort

    model = write_model(tmp_path / "model.onnx")
    res = run_cli("verify", model, model, "--provider", "BogusExecutionProvider", cwd=tmp_path, subprocess_=True)
    line = one_error_line(res)  # a real process: ONNX Runtime's own fallback banner would show on stderr
    assert "BogusExecutionProvider" in line and "CPUExecutionProvider" in line
    assert all(p in line for p in ort.get_available_providers())
    res = run_cli("verify", model, model, "--provider", "CPUExecutionProvider", cwd=tmp_path)
    assert res.returncode == 0, res.stderr


# -- LoraSession: slot metadata ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["{", _nested(10_000), '{"slots": ' + "[" * 10_000, '{"version": 1, "slots": [{"module": "fc"}]}'],
    ids=["truncated", "nested-10000", "nested-unclosed", "missing-fields"],
)
def test_lora_session_refuses_corrupt_slot_metadata_as_inspect_does(served, bad):
    root, _, _ = served
    model = with_metadata(root / "out" / "model.onnx", root / "out" / "bad.onnx", SLOTS_KEY, bad)
    with pytest.raises(ModelError, match="corrupt lora_export.slots metadata") as e:
        LoraSession(model, providers=["CPUExecutionProvider"])
    assert "\n" not in str(e.value)
    line = one_error_line(run_cli("inspect", model, cwd=root))
    assert "corrupt lora_export.slots metadata" in line
    # The intact model opens and serves the adapter exactly.
    ids = np.random.default_rng(5).integers(0, VOCAB, 3)
    got = _served_output(root / "out" / "model.onnx", root / "out" / "ad.onnx_adapter", ids)
    np.testing.assert_allclose(got, reference(ids, root / "ad"), rtol=1e-5, atol=1e-5)


# -- LoRA-drop group names ---------------------------------------------------------------------------


def _lora_drop_dir(root, group: str, members: list[str]):
    """A LoRA-drop adapter: ``fc`` kept with its own LoRA unless listed, ``members`` sharing ``group``."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    tensors = {
        f"{group}.lora_A.weight": rng.standard_normal((2, IN)).astype(np.float32),
        f"{group}.lora_B.weight": rng.standard_normal((OUT, 2)).astype(np.float32),
    }
    save_file(tensors, str(root / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA_DROP",
        "r": 2,
        "lora_alpha": 2,
        "target_modules": members,
        "shared_groups": {group: members},
    }
    (root / "adapter_config.json").write_text(json.dumps(cfg))
    return root


def test_lora_drop_group_with_peft_prefix_is_refused(tmp_path):
    model = write_model(tmp_path / "model.onnx")
    # The group's tensors would read as base_model.model.fc's own LoRA: fc is in no group.
    adapter = _lora_drop_dir(tmp_path / "drop", "base_model.model.fc", ["proj_a", "proj_b"])
    for cmd in (["inspect", model, adapter], ["merge", model, adapter, "-o", "merged.onnx"]):
        line = one_error_line(run_cli(*cmd, cwd=tmp_path))
        assert "base_model.model." in line and "prefix" in line
    assert not (tmp_path / "merged.onnx").exists()


def _target(name, seed):
    rng = np.random.default_rng(seed)
    return LoraTarget(name, "linear", rng.standard_normal((2, IN)).astype(np.float32),
                      rng.standard_normal((OUT, 2)).astype(np.float32), 1.0)  # fmt: skip


def test_group_names_that_read_as_modules_are_refused_at_save():
    a = _target("a", 1)
    b = LoraTarget("b", "linear", a.A, a.B, 1.0)
    targets = {"a": a, "b": b, "c": _target("c", 2)}
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["a", "b", "c"])
    Adapter(dict(targets), cfg, shared={"lora_drop.x": ("a", "b")})  # a sound group name
    with pytest.raises(AdapterError, match="prefix"):
        Adapter(dict(targets), cfg, shared={"base_model.model.c": ("a", "b")})
    with pytest.raises(AdapterError, match="outside the group"):
        Adapter(dict(targets), cfg, shared={"c": ("a", "b")})


def test_training_refuses_to_save_a_group_named_like_a_module(tmp_path):
    import torch
    from torch import nn

    from lora_export import attach_lora, save_adapter
    from lora_export.training.layers import SHARED_GROUP_ATTR

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    attach_lora(model, LoraConfig(r=2, lora_alpha=2, target_modules=["0", "1", "2"]), verbose=False)
    a, b = model[0], model[1]
    b.lora_A, b.lora_B = a.lora_A, a.lora_B  # one LoRA shared by 0 and 1, as LoRA-drop leaves it
    for name, ok in (("lora_drop.x", True), ("base_model.model.2", False), ("2", False)):
        for layer in (a, b):
            setattr(layer, SHARED_GROUP_ATTR, name)
        if ok:
            save_adapter(model, tmp_path / "ok")
            assert json.loads((tmp_path / "ok" / "adapter_config.json").read_text())["shared_groups"] == {
                name: ["0", "1"]
            }
        else:
            with pytest.raises(AdapterError, match="shared group"):
                save_adapter(model, tmp_path / name)
            assert not (tmp_path / name).exists()

"""An adapter is never applied twice without a word (issue 15 item 3), and duplicated or non-finite history
cannot hide earlier merges (issue 14 item 5). Tried as a user hits it: the CLI in a temp folder, a GPT-2 built
from a transformers config, references from PEFT and plain ONNX Runtime."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from conftest import peft_reference
from models import tiny_gpt2
from onnx_fixtures import export_onnx, run_onnx

from lora_export import LoraSession, load_adapter
from lora_export.cli import cli
from lora_export.errors import AdapterError
from lora_export.formats.adapter_files import read_adapter_tensors
from lora_export.graph.model.model_io import load_model
from lora_export.graph.model.provenance import HISTORY_KEY, UNREADABLE_KEY, HistoryError, read_history, record_problem
from lora_export.graph.model.slot_manifest import SLOTS_KEY, SlotManifest
from lora_export.graph.verbs.history_guard import slot_digests

PEFT_ARGS = {"r": 2, "lora_alpha": 4, "fan_in_fan_out": True}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 exported to ONNX, PEFT adapters a (c_attn, c_fc) and b (c_proj) for it, and both
    injected into served/."""
    root = tmp_path_factory.mktemp("guard")
    net, make_inputs = tiny_gpt2(0)
    base = export_onnx(net, make_inputs(0), root / "base.onnx", dynamo=False)
    peft = {}
    for seed, (name, targets) in enumerate({"a": ["c_attn", "c_fc"], "b": ["c_proj"]}.items(), 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft[name] = peft_reference(net, seed=seed, target_modules=targets, **PEFT_ARGS)
            peft[name].save_pretrained(root / name)
    shutil.copytree(root / "a", root / "copy")  # the same adapter under another name
    assert _cli("inject", base, root / "a", root / "b", "-o", root / "served").exit_code == 0
    return {"root": root, "net": net, "inputs": make_inputs, "base": base, "peft": peft}


def _cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def _one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _torch_out(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits.numpy()


def _with_b_doubled(peft_model):
    """The PEFT model with its adapter applied twice (ΔW doubled), as an independent reference."""
    twice = copy.deepcopy(peft_model)
    with torch.no_grad():
        for name, p in twice.named_parameters():
            if "lora_B" in name:
                p.mul_(2)
    return twice


def _merged_into_served(gpt2, tmp_path) -> Path:
    """served/model.onnx with adapter "copy" (= a) merged in, forced past the refusal."""
    out = tmp_path / "m.onnx"
    result = _cli("merge", gpt2["root"] / "served" / "model.onnx", gpt2["root"] / "copy", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    return out


# -- issue 15 item 3: merge into an injected model ------------------------------------------------------


def test_merge_into_injected_model_is_refused_then_recorded(gpt2, tmp_path):
    served = gpt2["root"] / "served"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _cli("merge", served / "model.onnx", gpt2["root"] / "copy", "-o", tmp_path / "m.onnx")
    _one_line_error(result, "adapter 'copy' has LoRA slots in this model", "history record 1", "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    merged = _merged_into_served(gpt2, tmp_path)
    history = read_history(load_model(merged))
    assert [(r["operation"], r["adapter"]) for r in history] == [("inject", "a"), ("inject", "b"), ("merge", "copy")]
    record = history[-1]
    assert record["forced"] is True and record_problem(record) is None
    # The record holds the digests of exactly what a's slot files hold, per slot.
    manifest = SlotManifest.from_json(load_model(served / "model.onnx").metadata_props[SLOTS_KEY])
    for suffix in (".onnx_adapter", ".safetensors"):
        assert record["slots"] == slot_digests(read_adapter_tensors(served / f"a{suffix}"), manifest)
    assert set(record["slots"]) == {t["target"] for t in record["targets"]}
    # The merged weights are a's: with no adapter, the merged model computes PEFT's a (plain ORT).
    inputs = gpt2["inputs"](5)
    ref = _torch_out(gpt2["peft"]["a"], inputs)
    np.testing.assert_allclose(run_onnx(merged, inputs), ref, rtol=1e-4, atol=1e-5)


def test_merge_into_a_model_injected_with_part_of_the_adapter_is_refused(gpt2, tmp_path):
    served = tmp_path / "served"
    result = _cli("inject", gpt2["base"], gpt2["root"] / "a", "-o", served, "--only-targets", "c_fc")
    assert result.exit_code == 0, result.output
    result = _cli("merge", served / "model.onnx", gpt2["root"] / "copy", "-o", tmp_path / "m.onnx")
    _one_line_error(result, "has LoRA slots in this model (target transformer.h.0.mlp.c_fc and more", "--force")
    assert _cli("merge", served / "model.onnx", gpt2["root"] / "b", "-o", tmp_path / "m.onnx").exit_code == 0


def test_session_refuses_the_merged_adapter_in_every_form(gpt2, tmp_path):
    served = gpt2["root"] / "served"
    merged = _merged_into_served(gpt2, tmp_path)
    session = LoraSession(merged, providers=["CPUExecutionProvider"])
    sources = {
        "slot file": served / "a.onnx_adapter",
        "safetensors": served / "a.safetensors",
        "PEFT folder": gpt2["root"] / "a",
        "Adapter": load_adapter(gpt2["root"] / "a"),
        "tensors": read_adapter_tensors(served / "a.onnx_adapter"),
    }
    for what, source in sources.items():
        with pytest.raises(AdapterError, match="already merged into this model.*force=True") as e:
            session.load_adapter("a", source)
        assert "\n" not in str(e.value), what
    assert session.adapters == []
    # b was never merged: it loads, and serves what PEFT computes for b on top of a merged base.
    session.load_adapter("b", served / "b.onnx_adapter")
    inputs = gpt2["inputs"](6)
    merged_net = copy.deepcopy(gpt2["peft"]["a"]).merge_and_unload()
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_b = PeftModel.from_pretrained(merged_net, str(gpt2["root"] / "b")).eval()
    feeds = {k: v.numpy() for k, v in inputs.items()}
    np.testing.assert_allclose(
        session.run(None, feeds, adapter="b")[0], _torch_out(ref_b, inputs), rtol=1e-4, atol=1e-5
    )
    # Forced, a is applied a second time: that is what PEFT gives with a's delta doubled.
    session.load_adapter("a", served / "a.onnx_adapter", force=True)
    twice = session.run(None, feeds, adapter="a")[0]
    np.testing.assert_allclose(twice, _torch_out(_with_b_doubled(gpt2["peft"]["a"]), inputs), rtol=1e-4, atol=1e-4)
    assert np.abs(twice - _torch_out(gpt2["peft"]["a"], inputs)).max() > 1e-3


def test_convert_refuses_the_merged_adapter(gpt2, tmp_path):
    merged = _merged_into_served(gpt2, tmp_path)
    out = tmp_path / "x.onnx_adapter"
    for adapter in ("a", "copy"):
        result = _cli("convert", gpt2["root"] / adapter, "--model", merged, "-o", out)
        _one_line_error(result, "already merged into this model", "history record 3", "--force")
        assert not out.exists()
    # Only a part of a (its c_fc targets): the targets' own digests still recognise it.
    result = _cli("convert", gpt2["root"] / "a", "--model", merged, "-o", out, "--only-targets", "c_fc")
    _one_line_error(result, "target", "already merged", "--force")
    assert _cli("convert", gpt2["root"] / "b", "--model", merged, "-o", out).exit_code == 0
    assert (
        _cli("convert", gpt2["root"] / "a", "--model", merged, "-o", tmp_path / "y.safetensors", "--force").exit_code
        == 0
    )
    served_a = read_adapter_tensors(gpt2["root"] / "served" / "a.safetensors")
    forced = read_adapter_tensors(tmp_path / "y.safetensors")
    assert forced.keys() == served_a.keys() and all(np.array_equal(forced[k], served_a[k]) for k in forced)


def test_inject_refuses_an_adapter_merged_already(gpt2, tmp_path):
    assert _cli("merge", gpt2["base"], gpt2["root"] / "a", "-o", tmp_path / "m.onnx").exit_code == 0
    result = _cli("inject", tmp_path / "m.onnx", gpt2["root"] / "copy", "-o", tmp_path / "served")
    _one_line_error(result, "already merged into this model", "slot file would apply it a second time", "--force")
    assert not (tmp_path / "served").exists()
    assert _cli("inject", tmp_path / "m.onnx", gpt2["root"] / "b", "-o", tmp_path / "served").exit_code == 0
    result = _cli("inject", tmp_path / "m.onnx", gpt2["root"] / "copy", "-o", tmp_path / "s2", "--force")
    assert result.exit_code == 0, result.output


def test_merging_twice_through_a_served_model_is_refused(gpt2, tmp_path):
    """merge a into the base, then into that again through any other path: refused."""
    assert _cli("merge", gpt2["base"], gpt2["root"] / "a", "-o", tmp_path / "m.onnx").exit_code == 0
    _one_line_error(
        _cli("merge", tmp_path / "m.onnx", gpt2["root"] / "copy", "-o", tmp_path / "m2.onnx"), "already merged"
    )


# -- issue 14 item 5: duplicated or contradictory provenance ---------------------------------------------------


def _with_entries(src: Path, dst: Path, entries: list[tuple[str, str]]) -> Path:
    """A copy of the (inline) model ``src`` with ``entries`` appended to its metadata (duplicates kept)."""
    proto = onnx.load(str(src))
    for key, value in entries:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(dst))
    return dst


def _stale_history(tmp_path, src: Path) -> Path:
    """``src`` (which has a history) with a second, stale ``[]`` history entry after the real one."""
    return _with_entries(src, tmp_path / "dup.onnx", [(HISTORY_KEY, "[]")])


def test_duplicated_history_cannot_hide_a_merge(gpt2, tmp_path):
    assert _cli("merge", gpt2["base"], gpt2["root"] / "a", "-o", tmp_path / "m.onnx").exit_code == 0
    real = load_model(tmp_path / "m.onnx").metadata_props[HISTORY_KEY]
    dup = _stale_history(tmp_path, tmp_path / "m.onnx")
    assert [p.key for p in onnx.load(str(dup)).metadata_props].count(HISTORY_KEY) == 2
    with pytest.raises(HistoryError, match="duplicated lora_export.history metadata"):
        read_history(load_model(dup))
    for cmd in (
        ["merge", dup, gpt2["root"] / "a", "-o", tmp_path / "twice.onnx"],
        ["merge", dup, gpt2["root"] / "b", "-o", tmp_path / "twice.onnx"],
        ["inject", dup, gpt2["root"] / "b", "-o", tmp_path / "served"],
    ):
        _one_line_error(_cli(*cmd), "duplicated lora_export.history", "contradictory provenance", "--force")
    assert not (tmp_path / "twice.onnx").exists() and not (tmp_path / "served").exists()
    # inspect describes the model and says why the history is refused.
    res = _cli("inspect", dup)
    assert res.exit_code == 0, res.output
    assert "history: unreadable (duplicated lora_export.history metadata" in res.stdout
    data = json.loads(_cli("inspect", dup, "--json").stdout)
    assert data["history"] is None and "duplicated" in data["history_error"]
    # --force: every entry is kept aside, the history restarts, the output holds one history.
    result = _cli("merge", dup, gpt2["root"] / "b", "-o", tmp_path / "forced.onnx", "--force")
    assert result.exit_code == 0, result.output
    out = onnx.load(str(tmp_path / "forced.onnx"))
    assert [p.key for p in out.metadata_props].count(HISTORY_KEY) == 1
    props = {p.key: p.value for p in out.metadata_props}
    assert json.loads(props[UNREADABLE_KEY]) == [real, "[]"]
    assert [r["adapter"] for r in json.loads(props[HISTORY_KEY])] == ["b"]


def test_duplicated_history_in_a_served_model(gpt2, tmp_path):
    merged = _merged_into_served(gpt2, tmp_path)
    dup = _stale_history(tmp_path, merged)
    out = tmp_path / "x.onnx_adapter"
    _one_line_error(_cli("convert", gpt2["root"] / "b", "--model", dup, "-o", out), "duplicated", "--force")
    assert _cli("convert", gpt2["root"] / "b", "--model", dup, "-o", out, "--force").exit_code == 0
    session = LoraSession(dup, providers=["CPUExecutionProvider"])
    with pytest.raises(HistoryError, match="duplicated lora_export.history.*force=True"):
        session.load_adapter("a", gpt2["root"] / "served" / "a.onnx_adapter")
    session.load_adapter("b", gpt2["root"] / "served" / "b.onnx_adapter", force=True)
    assert session.adapters == ["b"]


def test_duplicated_slot_metadata_is_refused(gpt2, tmp_path):
    served = gpt2["root"] / "served" / "model.onnx"
    dup = _with_entries(served, tmp_path / "dup.onnx", [(SLOTS_KEY, '{"slots": []}')])
    for cmd in (["inspect", dup], ["convert", gpt2["root"] / "b", "--model", dup, "-o", tmp_path / "x.onnx_adapter"]):
        _one_line_error(_cli(*cmd), "duplicated lora_export.slots metadata")
    with pytest.raises(Exception, match="duplicated lora_export.slots"):
        LoraSession(dup, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scale", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_scale_is_refused_when_read(gpt2, tmp_path, scale):
    assert _cli("merge", gpt2["base"], gpt2["root"] / "a", "-o", tmp_path / "m.onnx").exit_code == 0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    for p in proto.metadata_props:
        if p.key == HISTORY_KEY:
            p.value = p.value.replace('"scale":1.0', f'"scale":{scale}')
            assert scale in p.value
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(HistoryError, match="non-finite"):
        read_history(load_model(tmp_path / "bad.onnx"))
    _one_line_error(
        _cli("merge", tmp_path / "bad.onnx", gpt2["root"] / "b", "-o", tmp_path / "x.onnx"), "non-finite", "--force"
    )
    # Forced, it is set aside and the write succeeds (no internal error at save time).
    result = _cli("merge", tmp_path / "bad.onnx", gpt2["root"] / "b", "-o", tmp_path / "x.onnx", "--force")
    assert result.exit_code == 0, result.output
    assert [r["adapter"] for r in read_history(load_model(tmp_path / "x.onnx"))] == ["b"]
    res = _cli("inspect", tmp_path / "bad.onnx")
    assert res.exit_code == 0 and "non-finite" in res.stdout


def test_record_validation_refuses_non_finite_scales():
    good = {"operation": "merge", "adapter": "a", "adapter_sha256": "ab" * 32, "scale": 1.0, "version": "0"}
    assert record_problem(good) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert "not finite" in record_problem({**good, "scale": bad})
    assert record_problem({**good, "slots": {"fc": "xyz"}})

"""A wrong base checkpoint is caught where it can be (issue 15 item 4): adapter files we write carry a
fingerprint of the base weights they were made for; merge, inject, convert and LoraSession compare it with
the model (and with --base-weights), and refuse a mismatch in one line unless forced. Two GPT-2s of the same
architecture with other weights, built from a transformers config; references from PEFT."""

from __future__ import annotations

import copy
import json
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import peft_reference
from models import randomize_lora, tiny_gpt2
from onnx_fixtures import export_onnx, run_onnx

from lora_export import LoraConfig, LoraSession, attach_lora, load_adapter, save_adapter
from lora_export.cli import cli
from lora_export.core.fingerprint import FINGERPRINT_KEY, entry_problem, weight_entry
from lora_export.errors import AdapterError
from lora_export.formats.adapter_files import read_adapter_file
from lora_export.formats.safetensors import read_safetensors, write_safetensors

TARGETS = ["c_attn", "c_fc"]


def _state(net) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items() if k.startswith("transformer.")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """base.onnx and other.onnx (same GPT-2 architecture, other weights), their state dicts, an adapter saved by
    our save_adapter (fingerprinted) and one saved by PEFT (none), both made on the base."""
    root = tmp_path_factory.mktemp("fingerprint")
    base_net, make_inputs = tiny_gpt2(0)
    other_net, _ = tiny_gpt2(1)
    files = {"root": root, "inputs": make_inputs, "base_net": base_net}
    for name, net in (("base", base_net), ("other", other_net)):
        files[name] = export_onnx(net, make_inputs(0), root / f"{name}.onnx", dynamo=False)
        write_safetensors(root / f"{name}.safetensors", _state(net))
    ours = attach_lora(copy.deepcopy(base_net), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS), verbose=False)
    randomize_lora(ours, seed=5)
    save_adapter(ours.eval(), root / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_reference(
            base_net, seed=6, r=2, lora_alpha=4, target_modules=TARGETS, fan_in_fan_out=True
        ).save_pretrained(root / "peft")
    return files


def _cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def _refused(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in ("made for other base weights", "--force", *fragments):
        assert f.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _peft_on(net, folder):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(net), str(folder)).eval()


def _logits(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits.numpy()


def test_save_adapter_writes_a_fingerprint_peft_still_loads(setup):
    folder = setup["root"] / "ours"
    meta = read_safetensors(folder / "adapter_model.safetensors")[1]
    assert meta["format"] == "pt" and FINGERPRINT_KEY in meta
    adapter = load_adapter(folder)
    assert set(adapter.base_fingerprint) == set(adapter.targets) and len(adapter.targets) == 4
    # ΔW's layout: GPT-2's Conv1D weight (in, out) transposed back to (out, in); the value is the base's.
    w = setup["base_net"].transformer.h[1].attn.c_attn.weight.detach().numpy()
    entry = adapter.base_fingerprint["transformer.h.1.attn.c_attn"]
    assert entry["shape"] == [96, 32] and entry_problem(entry, w.T) is None and entry_problem(entry, w) is not None
    # PEFT loads our folder and computes what PEFT computes; the metadata changes nothing for it.
    inputs = setup["inputs"](3)
    ref = _logits(_peft_on(setup["base_net"], folder), inputs)
    assert _cli("merge", setup["base"], folder, "-o", setup["root"] / "m_ok.onnx").exit_code == 0
    np.testing.assert_allclose(run_onnx(setup["root"] / "m_ok.onnx", inputs), ref, rtol=1e-4, atol=1e-5)
    # Saved again by lora-export (save_adapter_files), the fingerprint goes along, byte for byte.
    from lora_export import save_adapter_files

    save_adapter_files(adapter, setup["root"] / "resaved")
    assert (setup["root"] / "resaved" / "adapter_model.safetensors").read_bytes() == (
        folder / "adapter_model.safetensors"
    ).read_bytes()


def test_merge_refuses_another_checkpoint(setup, tmp_path):
    line = _refused(_cli("merge", setup["other"], setup["root"] / "ours", "-o", tmp_path / "m.onnx"), "this model's")
    assert "transformer.h." in line and "sha256 differs" in line
    assert list(tmp_path.iterdir()) == []
    result = _cli("merge", setup["other"], setup["root"] / "ours", "-o", tmp_path / "m.onnx", "--force")
    assert result.exit_code == 0, result.output
    # PEFT's own folder carries no fingerprint: nothing to compare, it merges (inspect says so).
    assert _cli("merge", setup["other"], setup["root"] / "peft", "-o", tmp_path / "p.onnx").exit_code == 0


def test_base_weights_are_compared_too(setup, tmp_path):
    ours = setup["root"] / "ours"
    bw = ["--base-weights", setup["root"] / "other.safetensors"]
    _refused(_cli("merge", setup["base"], ours, "-o", tmp_path / "m.onnx", *bw), "--base-weights")
    _refused(_cli("inject", setup["base"], ours, "-o", tmp_path / "served", *bw), "--base-weights")
    own = ["--base-weights", setup["root"] / "base.safetensors"]
    assert _cli("merge", setup["base"], ours, "-o", tmp_path / "m.onnx", *own).exit_code == 0


def test_inject_and_convert_refuse_another_checkpoint(setup, tmp_path):
    ours = setup["root"] / "ours"
    _refused(_cli("inject", setup["other"], ours, "-o", tmp_path / "served"), "this model's")
    assert not (tmp_path / "served").exists()
    assert _cli("inject", setup["other"], setup["root"] / "peft", "-o", tmp_path / "served").exit_code == 0
    out = tmp_path / "x.onnx_adapter"
    _refused(_cli("convert", ours, "--model", tmp_path / "served" / "model.onnx", "-o", out), "this model's")
    assert not out.exists()
    result = _cli("convert", ours, "--model", tmp_path / "served" / "model.onnx", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert _cli("inject", setup["other"], ours, "-o", tmp_path / "forced", "--force").exit_code == 0


def test_session_refuses_slot_files_of_another_checkpoint(setup, tmp_path):
    ours = setup["root"] / "ours"
    assert _cli("inject", setup["base"], ours, "-o", tmp_path / "base_served").exit_code == 0
    assert _cli("inject", setup["other"], setup["root"] / "peft", "-o", tmp_path / "other_served").exit_code == 0
    slot_files = [tmp_path / "base_served" / f"ours{s}" for s in (".onnx_adapter", ".safetensors")]
    assert isinstance(read_adapter_file(slot_files[0])[1], int) and isinstance(
        read_adapter_file(slot_files[1])[1], dict
    )
    other = LoraSession(tmp_path / "other_served" / "model.onnx", providers=["CPUExecutionProvider"])
    for source in (*slot_files, ours, load_adapter(ours)):
        with pytest.raises(AdapterError, match="made for other base weights than this model's.*force=True"):
            other.load_adapter("ours", source)
    # Its own base serves it as PEFT computes it; the other's, forced.
    inputs = setup["inputs"](4)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    own = LoraSession(tmp_path / "base_served" / "model.onnx", providers=["CPUExecutionProvider"])
    ref = _logits(_peft_on(setup["base_net"], ours), inputs)
    for i, source in enumerate((*slot_files, ours)):
        own.load_adapter(f"a{i}", source)
        np.testing.assert_allclose(own.run(None, feeds, adapter=f"a{i}")[0], ref, rtol=1e-4, atol=1e-5)
    other.load_adapter("ours", slot_files[0], force=True)
    # The ORT-native path still works with the fingerprint code in the adapter version.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "base_served" / "model.onnx"), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(slot_files[0]))
    opts = ort.RunOptions()
    opts.add_active_adapter(lora)
    np.testing.assert_allclose(sess.run(None, feeds, opts)[0], ref, rtol=1e-4, atol=1e-5)


def test_a_merged_weight_is_not_compared(setup, tmp_path):
    """After a merge changed c_attn, a second fingerprinted adapter on c_attn is not refused for it."""
    net = setup["base_net"]
    second = attach_lora(copy.deepcopy(net), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]), verbose=False)
    randomize_lora(second, seed=9)
    save_adapter(second.eval(), tmp_path / "second")
    assert _cli("merge", setup["base"], setup["root"] / "ours", "-o", tmp_path / "m1.onnx").exit_code == 0
    result = _cli("merge", tmp_path / "m1.onnx", tmp_path / "second", "-o", tmp_path / "m2.onnx")
    assert result.exit_code == 0, result.output
    # Into the injected model with ours merged, the second's slot file still loads.
    assert _cli("inject", setup["base"], tmp_path / "second", "-o", tmp_path / "served").exit_code == 0
    merged = tmp_path / "sm.onnx"
    assert _cli("merge", tmp_path / "served" / "model.onnx", setup["root"] / "ours", "-o", merged).exit_code == 0
    LoraSession(merged, providers=["CPUExecutionProvider"]).load_adapter(
        "second", tmp_path / "served" / "second.onnx_adapter"
    )


def test_inspect_says_whether_an_adapter_has_a_fingerprint(setup):
    res = _cli("inspect", setup["base"], setup["root"] / "peft")
    assert res.exit_code == 0, res.output
    assert "base fingerprint: none (not written by lora-export)" in res.stdout
    assert json.loads(_cli("inspect", setup["base"], setup["root"] / "peft", "--json").stdout)["base_fingerprint"] == {
        "present": False
    }
    res = _cli("inspect", setup["base"], setup["root"] / "ours")
    assert "base fingerprint: matches this model's weights (4 of 4 targets checked)" in res.stdout
    res = _cli("inspect", setup["other"], setup["root"] / "ours", "--json")
    data = json.loads(res.stdout)["base_fingerprint"]
    assert data["present"] and len(data["differs"]) == 4
    assert "DIFFERS from this model's weights" in _cli("inspect", setup["other"], setup["root"] / "ours").stdout


def test_entry_compares_across_dtypes_and_quantization():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 16)).astype(np.float32)
    entry = weight_entry(w)
    other = rng.standard_normal((24, 16)).astype(np.float32)
    assert entry_problem(entry, w) is None and entry_problem(entry, other) is not None
    assert "shape" in entry_problem(entry, w.T)
    # Stored narrower (float16, bfloat16): the model holds the weight rounded; that matches, another does not.
    for dt in (np.float16, ml_dtypes.bfloat16):
        rounded = w.astype(dt).astype(np.float32)
        assert entry_problem(entry, rounded, stored_dtype=np.dtype(dt)) is None
        assert entry_problem(entry, other.astype(dt).astype(np.float32), stored_dtype=np.dtype(dt)) is not None
    # Stored at the same precision, a rounded copy is another weight (a fine-tuned checkpoint, say).
    assert entry_problem(entry, w.astype(np.float16).astype(np.float32)) is not None
    # Quantized (read back dequantized): int8-like rounding matches, another checkpoint does not.
    scale = np.abs(w).max() / 127
    assert entry_problem(entry, np.round(w / scale) * scale, lossy=True) is None
    assert entry_problem(entry, other, lossy=True) is not None
    # bfloat16 base weights (torch): recorded as such, compared exactly when stored the same.
    bf = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert entry_problem(weight_entry(bf, dtype="bfloat16"), bf, stored_dtype=np.dtype(ml_dtypes.bfloat16)) is None

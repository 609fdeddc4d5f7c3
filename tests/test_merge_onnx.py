"""merge against PEFT: merged ONNX model (onnxruntime) == PEFT's unmerged output, for several
models, both torch exporters, LoRA variants, dtypes and target kinds; graph unchanged; deterministic."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import output_of, peft_reference
from models import conv_embed_net, tiny_bert, tiny_gpt2, tiny_llama
from onnx_fixtures import Wrapped, export_onnx, file_hashes, run_onnx

from lora_export import load_adapter, merge_adapter, merge_file
from lora_export.core.delta import merged_weight
from lora_export.errors import ShapeError, TargetError
from lora_export.graph.verbs import merge as merge_module

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each (model, exporter) base once per module: key → (base model, make_inputs, onnx path)."""
    root = tmp_path_factory.mktemp("bases")
    cache: dict = {}

    def get(name: str, dynamo: bool):
        key = (name, dynamo)
        if key not in cache:
            model, make_inputs = BUILDERS[name]()
            path = export_onnx(model, make_inputs(0), root / f"{name}-{int(dynamo)}.onnx", dynamo=dynamo)
            cache[key] = (model, make_inputs, path)
        return cache[key]

    return get


def _rel_err(actual: np.ndarray, expected: torch.Tensor) -> float:
    exp = expected.detach().float().numpy()
    return float(np.abs(actual - exp).max() / np.abs(exp).max())


def _peft_adapter(base, tmp_path, **config):
    """PEFT model with random nonzero LoRA, saved; returns (peft model, adapter dir)."""
    peft_model = peft_reference(base, **config)
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)
    return peft_model, out


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_merge_matches_peft(exported, tmp_path, name, dynamo):
    base, make_inputs, onnx_path = exported(name, dynamo)
    peft_model, adapter_dir = _peft_adapter(
        base, tmp_path, r=4, lora_alpha=8, target_modules=TARGETS[name], fan_in_fan_out=name == "gpt2"
    )
    inputs = make_inputs(11)
    ref = output_of(peft_model, inputs)  # before anything is exported or merged
    base_out = run_onnx(onnx_path, inputs)
    assert _rel_err(base_out, ref) > 1e-3, "the adapter must change the output (non-vacuous test)"

    before = file_hashes(onnx_path, adapter_dir)
    report = merge_file(onnx_path, adapter_dir, tmp_path / "merged.onnx")
    assert file_hashes(onnx_path, adapter_dir) == before
    assert not report.resolution.unmatched and len(report.merged) == len(report.resolution.targets)
    assert _rel_err(run_onnx(tmp_path / "merged.onnx", inputs), ref) <= 1e-5
    _assert_same_graph(onnx_path, tmp_path / "merged.onnx")


def _assert_same_graph(a, b) -> None:
    ga, gb = ir.load(a).graph, ir.load(b).graph

    def sig(g):
        return [
            (n.op_type, n.domain, [i.name if i else None for i in n.inputs], [o.name for o in n.outputs]) for n in g
        ]

    assert sig(ga) == sig(gb)
    assert [v.name for v in ga.inputs] == [v.name for v in gb.inputs]
    assert [v.name for v in ga.outputs] == [v.name for v in gb.outputs]
    assert sorted(ga.initializers) == sorted(gb.initializers)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_wrapped_model_prefix(tmp_path, dynamo):
    """A model wrapped in another module: every ONNX name gains a prefix the adapter lacks."""
    base, make_inputs = tiny_llama()
    peft_model, adapter_dir = _peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    inputs = make_inputs(3)
    ref = output_of(peft_model, inputs)
    onnx_path = export_onnx(Wrapped(base), make_inputs(0), tmp_path / "wrapped.onnx", dynamo=dynamo)
    merge_file(onnx_path, adapter_dir, tmp_path / "merged.onnx")
    assert _rel_err(run_onnx(tmp_path / "merged.onnx", inputs), ref) <= 1e-5


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_variants(exported, tmp_path, variant):
    base, make_inputs, onnx_path = exported("llama", False)
    extra = {"use_rslora": True} if variant == "rslora" else {"use_dora": True}
    peft_model, adapter_dir = _peft_adapter(
        base, tmp_path, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], **extra
    )
    inputs = make_inputs(5)
    ref = output_of(peft_model, inputs)
    report = merge_file(onnx_path, adapter_dir, tmp_path / "merged.onnx")
    assert len(report.merged) == 6
    assert _rel_err(run_onnx(tmp_path / "merged.onnx", inputs), ref) <= 1e-5


def test_scale(exported, tmp_path):
    """--scale 0 leaves the weights as they were; --scale 0.5 halves every delta."""
    base, make_inputs, onnx_path = exported("llama", True)
    peft_model, adapter_dir = _peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    inputs = make_inputs(2)
    merge_file(onnx_path, adapter_dir, tmp_path / "zero.onnx", scale=0.0)
    np.testing.assert_array_equal(run_onnx(tmp_path / "zero.onnx", inputs), run_onnx(onnx_path, inputs))
    for module in peft_model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            module.scaling["default"] *= 0.5
    merge_file(onnx_path, adapter_dir, tmp_path / "half.onnx", scale=0.5)
    assert _rel_err(run_onnx(tmp_path / "half.onnx", inputs), output_of(peft_model, inputs)) <= 1e-5


def test_absent_target_needs_proof(exported, tmp_path):
    """BERT's pooler is not in a last_hidden_state-only export. Names alone cannot prove that (a renamed
    module looks the same), so without base weights it is refused; with them it is proven absent by value."""
    base, make_inputs, onnx_path = exported("bert", False)
    peft_model, adapter_dir = _peft_adapter(
        base, tmp_path, r=4, lora_alpha=8, target_modules=["query", "value", "pooler.dense"]
    )
    with pytest.raises(TargetError, match=r"pooler\.dense.*--base-weights"):
        merge_file(onnx_path, adapter_dir, tmp_path / "refused.onnx")
    assert not (tmp_path / "refused.onnx").exists()
    weights = {k: v.detach().numpy() for k, v in base.state_dict().items()}
    inputs = make_inputs(4)
    ref = output_of(peft_model, inputs)
    report = merge_file(onnx_path, adapter_dir, tmp_path / "merged.onnx", base_weights=weights)
    assert [r.target.name for r in report.resolution.absent] == ["pooler.dense"]
    assert not report.resolution.unmatched
    assert _rel_err(run_onnx(tmp_path / "merged.onnx", inputs), ref) <= 1e-5


def test_conv_and_embedding_targets(tmp_path):
    base, make_inputs = conv_embed_net()
    peft_model, adapter_dir = _peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["emb", "conv", "head"])
    inputs = make_inputs(6)
    ref = output_of(peft_model, inputs)
    for dynamo in (False, True):
        onnx_path = export_onnx(base, make_inputs(0), tmp_path / f"net{int(dynamo)}.onnx", dynamo=dynamo)
        report = merge_file(onnx_path, adapter_dir, tmp_path / f"merged{int(dynamo)}.onnx")
        assert {r.layout.op_type for r in report.resolution.matched} >= {"Gather", "Conv"}
        assert _rel_err(run_onnx(tmp_path / f"merged{int(dynamo)}.onnx", inputs), ref) <= 1e-5


def test_grouped_conv_cannot_merge(tmp_path):
    base, make_inputs = conv_embed_net()
    onnx_path = export_onnx(base, make_inputs(0), tmp_path / "net.onnx", dynamo=False)
    adapter = load_adapter(_peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["conv"])[1])
    t = adapter.targets["conv"]
    # PEFT's grouped-conv LoRA shape for gconv (groups=2): A (r, 8, 3, 3), B (8, r/2, 1, 1)
    grouped = type(t)("gconv", "conv", np.ones((4, 8, 3, 3), np.float32), np.ones((8, 2, 1, 1), np.float32), 1.0)
    adapter.targets = {"gconv": grouped}
    before = file_hashes(onnx_path)
    with pytest.raises(ShapeError, match="grouped convolution"):
        merge_file(onnx_path, adapter, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists() and file_hashes(onnx_path) == before


def test_fp16_model_rounds_once(exported, tmp_path):
    """fp16 weights: ours == fp32 merge rounded once, and no worse than PEFT's own fp16 merge."""
    base, _, onnx_path = exported("llama", False)
    peft_model, adapter_dir = _peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    model = ir.load(onnx_path)
    for value in model.graph.initializers.values():
        if value.const_value.dtype == ir.DataType.FLOAT:
            arr = value.const_value.numpy().astype(np.float16)
            value.const_value = ir.tensor(arr, name=value.name)
    w16 = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}
    adapter = load_adapter(adapter_dir)
    report = merge_adapter(model, adapter)
    peft16 = copy.deepcopy(peft_model).half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged16 = peft16.merge_and_unload()
    for entry in report.merged:
        t = adapter.targets[entry["target"]]
        name = entry["initializer"]
        ours = model.graph.initializers[name].const_value.numpy()
        assert ours.dtype == np.float16
        w0 = w16[name].astype(np.float64).T  # MatMul stores Wᵀ
        exact = merged_weight(w0, t, np.float64)
        np.testing.assert_array_equal(ours.T, merged_weight(w0, t, np.float32).astype(np.float16))
        theirs = merged16.get_submodule(t.name).weight.detach().numpy().astype(np.float64)
        assert np.abs(ours.T - exact).max() <= np.abs(theirs - exact).max() + 1e-12


def _refuse(*_args, **_kwargs):
    raise ShapeError("stand-in refusal")


def test_deterministic_and_external_data(tmp_path):
    """Same inputs → same bytes; an external-data base gives an external-data output."""
    base, make_inputs = tiny_llama()
    _, adapter_dir = _peft_adapter(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    onnx_path = export_onnx(base, make_inputs(0), tmp_path / "ext.onnx", dynamo=False, external=True)
    assert (tmp_path / "ext.onnx.data").exists()
    a = merge_file(onnx_path, adapter_dir, tmp_path / "a" / "m.onnx").files
    b = merge_file(onnx_path, adapter_dir, tmp_path / "b" / "m.onnx").files
    assert [p.rsplit("/", 1)[1] for p in a][1:] == ["m.onnx"] and a[0].endswith(".data")
    assert a[0].rsplit("/", 1)[1] == b[0].rsplit("/", 1)[1]  # the data file's name follows its content
    for pa, pb in zip(a, b):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    inputs = make_inputs(1)
    np.testing.assert_array_equal(
        run_onnx(tmp_path / "a" / "m.onnx", inputs), run_onnx(tmp_path / "b" / "m.onnx", inputs)
    )
    # The copy begun while the merge is computed == the copy begun at the save.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(merge_module, "start_copy", lambda *args: None)
        late = merge_file(onnx_path, adapter_dir, tmp_path / "d" / "m.onnx").files
    assert [open(p, "rb").read() for p in late] == [open(p, "rb").read() for p in a]
    # A refusal after the copy began leaves no output and no staging folder.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(merge_module, "merge_adapter", _refuse)
        with pytest.raises(ShapeError, match="stand-in"):
            merge_file(onnx_path, adapter_dir, tmp_path / "e" / "m.onnx")
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())
    # The fast path (patched copy of the base's data file) == a full re-serialization.
    inline = merge_file(onnx_path, adapter_dir, tmp_path / "c" / "m.onnx", external=False).files
    assert [p.rsplit("/", 1)[1] for p in inline] == ["m.onnx"]
    np.testing.assert_array_equal(
        run_onnx(tmp_path / "c" / "m.onnx", inputs), run_onnx(tmp_path / "a" / "m.onnx", inputs)
    )


def test_extra_tensors_replace_initializers(tmp_path):
    """Trained biases (bias="lora_only") replace the base's bias initializers by name."""
    base, make_inputs = tiny_bert()
    peft_model, adapter_dir = _peft_adapter(
        base, tmp_path, r=4, lora_alpha=8, target_modules=["query"], bias="lora_only"
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("query.base_layer.bias"):
                p.add_(torch.randn(p.shape) * 0.5)
    peft_model.save_pretrained(adapter_dir)
    inputs = make_inputs(8)
    ref = output_of(peft_model, inputs)
    # Random biases: TorchScript folds equal initializers (all-zero biases) into one.
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.1)
    for name, p in peft_model.named_parameters():
        if name.endswith("bias") and "query" not in name:
            with torch.no_grad():
                p.copy_(base.get_parameter(name.replace("base_model.model.", "").replace(".base_layer", "")))
    ref = output_of(peft_model, inputs)
    onnx_path = export_onnx(base, make_inputs(0), tmp_path / "bert.onnx", dynamo=False)
    report = merge_file(onnx_path, adapter_dir, tmp_path / "merged.onnx")
    assert len(report.replaced) == 2, report.to_dict()["extras"]
    assert _rel_err(run_onnx(tmp_path / "merged.onnx", inputs), ref) <= 1e-5


def test_deduplicated_extra_gets_private_copy(exported, tmp_path):
    """All-zero biases share one initializer in a TorchScript export (copies through Identity): a trained
    bias gets its own initializer and every other module keeps the shared one."""
    base, make_inputs, onnx_path = exported("bert", False)
    peft_model = peft_reference(base, r=4, lora_alpha=8, target_modules=["query"], bias="lora_only")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("query.base_layer.bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    inputs = make_inputs(8)
    report = merge_file(onnx_path, tmp_path / "adapter", tmp_path / "merged.onnx")
    assert any("private_copy_of" in r for r in report.replaced)
    assert _rel_err(run_onnx(tmp_path / "merged.onnx", inputs), output_of(peft_model, inputs)) <= 1e-5

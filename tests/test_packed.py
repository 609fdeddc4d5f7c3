"""Packed q/k/v (the onnxruntime-genai builder's ``attn/qkv_proj`` MatMul): each target's slice is found by
value with ``--base-weights``, merged into its own slice, or injected as a branch landing in its slice;
by names alone it is refused in one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, peft_reference
from foreign_graphs import packed_attention, run_injected, run_plain
from inject_fixtures import REF_SEED, export_base, feeds_of
from models import tiny_llama
from safetensors.numpy import save_file
from torch import nn

from lora_export.cli import cli
from lora_export.errors import ModelError
from lora_export.formats.peft import load_adapter
from lora_export.graph.targets.resolve import resolve_targets
from lora_export.graph.verbs.inject import inject_adapters, inject_files
from lora_export.runtime.session import LoraSession

ADAPTERS = {
    "qv_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "qkvo_r2": dict(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


def _cli(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [*map(str, args)])
    return res.exit_code, res.stdout, res.stderr


def pack_qkv(src, dst) -> None:
    """Rewrite every layer's q/k/v MatMuls (one input, weights (in, out)) into the genai builder's layout:
    one MatMul ``/model/layers.N/attn/qkv_proj/MatMul`` on concat([Wqᵀ, Wkᵀ, Wvᵀ], axis=1), then a Split."""
    model = ir.load(src)
    graph = model.graph
    layers: dict[str, dict[str, ir.Node]] = {}
    for node in graph:
        for p in ("q_proj", "k_proj", "v_proj"):
            if node.op_type == "MatMul" and node.name.endswith(f"self_attn/{p}/MatMul"):
                layer = node.name.split("/layers.")[1].split("/")[0]
                layers.setdefault(layer, {})[p] = node
    assert layers
    for n, parts in sorted(layers.items()):
        nodes = [parts[p] for p in ("q_proj", "k_proj", "v_proj")]
        x = nodes[0].inputs[0]
        assert all(m.inputs[0] is x for m in nodes)
        weights = [m.inputs[1] for m in nodes]
        packed = np.concatenate([w.const_value.numpy() for w in weights], axis=1)
        name = f"model.layers.{n}.attn.qkv_proj.MatMul.weight"
        w = ir.Value(name=name, const_value=ir.tensor(packed, name=name))
        graph.register_initializer(w)
        sizes = [int(v.const_value.shape[1]) for v in weights]
        split = ir.Value(name=f"{name}.split", const_value=ir.tensor(np.array(sizes, np.int64), name=f"{name}.split"))
        graph.register_initializer(split)
        mm = ir.node("MatMul", [x, w], name=f"/model/layers.{n}/attn/qkv_proj/MatMul")
        sp = ir.node("Split", [mm.outputs[0], split], attributes={"axis": -1}, num_outputs=3)
        sp.name = f"/model/layers.{n}/attn/qkv_proj/Split"
        graph.insert_before(nodes[0], [mm, sp])
        for old, new in zip(nodes, sp.outputs, strict=True):
            old.outputs[0].replace_all_uses_with(new)
            graph.remove(old, safe=True)
        for v in weights:
            del graph.initializers[v.name]
    ir.save(model, dst)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    base, make_inputs = tiny_llama()
    export_base(base, make_inputs(0), root / "plain.onnx")
    pack_qkv(root / "plain.onnx", root / "base.onnx")
    weights = root / "base.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in base.state_dict().items()}, str(weights))
    fresh = make_inputs(REF_SEED)
    refs, paths = {}, {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = peft_reference(base, seed=10 + i, **config)
            refs[name] = output_of(peft_model, fresh).numpy()
            peft_model.save_pretrained(str(root / name))
        paths[name] = root / name
    feeds = feeds_of(fresh)
    # The packed graph computes the base model (checked once, here).
    base_out = run_plain(root / "base.onnx", feeds)[0]
    np.testing.assert_allclose(base_out, output_of(base, fresh).numpy(), rtol=1e-4, atol=1e-5)
    return dict(root=root, base=root / "base.onnx", weights=weights, feeds=feeds, refs=refs, paths=paths, out=base_out)


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _packed_weights(path) -> dict[str, np.ndarray]:
    inits = ir.load(path).graph.initializers
    return {k: v.const_value.numpy() for k, v in inits.items() if k.endswith("qkv_proj.MatMul.weight")}


def test_resolution_finds_each_slice_by_value(case):
    from safetensors.numpy import load_file

    model = ir.load(case["base"])
    adapter = load_adapter(case["paths"]["qkvo_r2"])
    res = resolve_targets(model, adapter, base_weights=load_file(str(case["weights"])))
    assert not res.unmatched and not res.absent
    packed = {r.target.name.split("model.")[-1]: r for r in res.matched if r.strategy == "packed"}
    assert len(packed) == 6  # q, k, v of two layers; o_proj by name
    q, k, v = (packed[f"layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert (q.layout.offset, k.layout.offset, v.layout.offset) == (0, 32, 48)
    assert (q.layout.width, k.layout.width, v.layout.width) == (32, 16, 16)
    assert "packed slice [32:48] of 64" in k.to_dict()["layout"]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_merge_with_base_weights_is_exact(case, tmp_path, name):
    out = tmp_path / "merged.onnx"
    code, _, err = _cli("merge", case["base"], case["paths"][name], "-o", out, "--base-weights", case["weights"])
    assert code == 0, err
    got = run_plain(out, case["feeds"])[0]
    assert _rel_err(got, case["refs"][name]) <= 1e-5
    before, after = _packed_weights(case["base"]), _packed_weights(out)
    assert len(before) == 2
    for key, w in before.items():
        if name == "qv_r4":
            # k's columns are bit-identical; q's and v's changed.
            np.testing.assert_array_equal(after[key][:, 32:48], w[:, 32:48])
            assert not np.array_equal(after[key][:, :32], w[:, :32])
            assert not np.array_equal(after[key][:, 48:], w[:, 48:])
        else:
            assert not np.array_equal(after[key][:, 32:48], w[:, 32:48])


def test_names_alone_are_refused(case, tmp_path):
    out = tmp_path / "merged.onnx"
    code, _, err = _cli("merge", case["base"], case["paths"]["qv_r4"], "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "q_proj" in err and "--base-weights" in err and "packed" in err
    assert not out.exists()
    code, _, err = _cli("inject", case["base"], case["paths"]["qv_r4"], "-o", tmp_path / "inj")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--base-weights" in err, err


def test_inject_with_base_weights_swaps_adapters_of_different_ranks(case, tmp_path):
    out_dir = tmp_path / "injected"
    names = list(ADAPTERS)
    inject_files(case["base"], [case["paths"][n] for n in names], out_dir, base_weights=case["weights"])
    model = out_dir / "model.onnx"
    # No adapter: the rank-0 defaults (Pad of a (0, width) B′) give the base model exactly.
    np.testing.assert_array_equal(run_plain(model, case["feeds"])[0], case["out"])
    for name in names:
        got = run_injected(model, out_dir / f"{name}.onnx_adapter", case["feeds"])[0]
        assert _rel_err(got, case["refs"][name]) <= 1e-5, name
    slots = json.loads(ir.load(model).metadata_props["lora_export.slots"])["slots"]
    q = next(s for s in slots if s["module"].endswith("layers.0.self_attn.q_proj"))
    k = next(s for s in slots if s["module"].endswith("layers.0.self_attn.k_proj"))
    # Slots take the target's own shapes; the packed op is recorded as their node.
    assert q["weight_shape"] == [32, 32] and k["weight_shape"] == [16, 32]
    assert q["node"] == k["node"] == "/model/layers.0/attn/qkv_proj/MatMul"


def test_convert_later_adapter_for_packed_slots(case, tmp_path):
    out_dir = tmp_path / "injected"
    inject_files(case["base"], [case["paths"]["qkvo_r2"]], out_dir, base_weights=case["weights"])
    late = tmp_path / "late.onnx_adapter"
    code, _, err = _cli("convert", case["paths"]["qv_r4"], "--model", out_dir / "model.onnx", "-o", late)
    assert code == 0, err
    got = run_injected(out_dir / "model.onnx", late, case["feeds"])[0]
    assert _rel_err(got, case["refs"]["qv_r4"]) <= 1e-5
    # LoraSession maps a PEFT directory onto the same slots in memory, next to the injected adapter.
    sess = LoraSession(out_dir / "model.onnx", providers=["CPUExecutionProvider"])
    sess.load_adapter("late", case["paths"]["qv_r4"])
    sess.load_adapter("qkvo", out_dir / "qkvo_r2.onnx_adapter")
    assert _rel_err(sess.run(None, case["feeds"], adapter="late")[0], case["refs"]["qv_r4"]) <= 1e-5
    assert _rel_err(sess.run(None, case["feeds"], adapter="qkvo")[0], case["refs"]["qkvo_r2"]) <= 1e-5
    np.testing.assert_array_equal(sess.run(None, case["feeds"])[0], case["out"])


def test_dora_on_a_packed_slice_is_refused(case, tmp_path):
    from safetensors.numpy import load_file

    adapter = load_adapter(case["paths"]["qv_r4"])
    with pytest.raises(ModelError, match="DoRA adapter cannot be injected into a packed projection"):
        inject_adapters(ir.load(case["base"]), [adapter], base_weights=load_file(str(case["weights"])), dora=True)
    args = ["-o", tmp_path / "inj", "--base-weights", case["weights"], "--dora"]
    code, _, err = _cli("inject", case["base"], case["paths"]["qv_r4"], *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "DoRA" in err and "q_proj" in err, err
    assert not (tmp_path / "inj").exists()


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8, bias=False) for _ in range(4))
        self.unused = nn.Linear(8, 8, bias=False)  # never called: not in the graph

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


def _genai_attn(m: _Attn, path, gemm: bool = False) -> None:
    """q/k/v packed into one MatMul (or Gemm transB=1, stored (out, in)), Split, then o_proj."""
    packed_attention(m, path, gemm=gemm)


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul", "gemm-transB"])
def test_packed_weight_accounts_for_its_slices_in_absence_proofs(tmp_path, gemm):
    """A module never called (``unused``) is absent only with proof: the packed tensor, whose every slice is
    a base weight, accounts for itself; the merge skips ``unused`` and is exact."""
    torch.manual_seed(0)
    m = _Attn().eval()
    _genai_attn(m, tmp_path / "model.onnx", gemm=gemm)
    save_file({k: v.detach().numpy().copy() for k, v in m.state_dict().items()}, str(tmp_path / "w.st"))
    peft_model = peft_reference(m, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "unused"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "merged.onnx"
    args = ["-o", out, "--base-weights", tmp_path / "w.st"]
    code, _, err = _cli("merge", tmp_path / "model.onnx", tmp_path / "adapter", *args)
    assert code == 0, err
    x = torch.randn(2, 8)
    ref = peft_model(x).detach().numpy()
    assert _rel_err(run_plain(out, {"x": x.numpy()})[0], ref) <= 1e-5
    inj = tmp_path / "inj"
    inject_files(tmp_path / "model.onnx", [tmp_path / "adapter"], inj, base_weights=tmp_path / "w.st")
    got = run_injected(inj / "model.onnx", inj / "adapter.onnx_adapter", {"x": x.numpy()})[0]
    assert _rel_err(got, ref) <= 1e-5


def test_shared_packed_weight_is_refused(tmp_path):
    """A packed weight read by a second node (another module, or the module called twice) is refused."""
    torch.manual_seed(0)
    m = _Attn().eval()
    _genai_attn(m, tmp_path / "model.onnx")
    model = ir.load(tmp_path / "model.onnx")
    w = model.graph.initializers["qkv_proj.MatMul.weight"]
    extra = ir.node("MatMul", [model.graph.inputs[0], w], name="/other/MatMul")
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    extra.outputs[0].name = "other"
    ir.save(model, tmp_path / "model.onnx")
    weights = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    peft_model = peft_reference(m, r=2, lora_alpha=4, target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    adapter = load_adapter(tmp_path / "adapter")
    res = resolve_targets(ir.load(tmp_path / "model.onnx"), adapter, base_weights=weights)
    assert res.unmatched and "shared packed weights are not supported" in res.unmatched[0].detail


def _qv_adapter(m: _Attn, tmp_path):
    peft_model = peft_reference(m, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    return load_adapter(tmp_path / "adapter")


@pytest.mark.parametrize("where", ["second-packed-weight", "loose-constant"])
def test_a_slice_held_twice_is_not_guessed(tmp_path, where):
    """q's weight also elsewhere in the graph (a second packed copy, or a constant no supported op reads):
    the one slice could not be the only place the module is applied; unmatched, never guessed."""
    torch.manual_seed(0)
    m = _Attn().eval()
    _genai_attn(m, tmp_path / "model.onnx")
    model = ir.load(tmp_path / "model.onnx")
    graph = model.graph
    if where == "second-packed-weight":
        w = graph.initializers["qkv_proj.MatMul.weight"]
        copy = ir.Value(name="qkv.copy", const_value=ir.tensor(w.const_value.numpy().copy(), name="qkv.copy"))
        graph.register_initializer(copy)
        extra = ir.node("MatMul", [graph.inputs[0], copy], name="/other/MatMul")
    else:
        wq = m.q_proj.weight.detach().numpy().copy()
        extra = ir.node("Constant", [], attributes={"value": ir.tensor(wq, name="wq")}, name="/other/Constant")
    graph.append(extra)
    extra.outputs[0].name = "other"
    graph.outputs.append(extra.outputs[0])
    weights = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    res = resolve_targets(model, _qv_adapter(m, tmp_path), base_weights=weights)
    assert [r.target.name.rsplit(".", 1)[-1] for r in res.unmatched] == ["q_proj"] + (
        ["v_proj"] if where == "second-packed-weight" else []
    )


def test_fp16_packed_merge_rounds_once_and_keeps_other_slices(tmp_path):
    """In a float16 packed weight, the merged slices are W₀ + ΔW (computed in float32) rounded once into
    float16; k's slice stays bit-identical."""
    from lora_export.graph.verbs.merge import merge_adapter

    torch.manual_seed(0)
    m = _Attn().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())  # the base is float16-exact, so the fp16 graph holds it by value
    _genai_attn(m, tmp_path / "model.onnx")
    model = ir.load(tmp_path / "model.onnx")
    for v in model.graph.initializers.values():
        if v.const_value.dtype == ir.DataType.FLOAT:
            v.const_value = ir.tensor(v.const_value.numpy().astype(np.float16), name=v.name)
    before = model.graph.initializers["qkv_proj.MatMul.weight"].const_value.numpy().copy()
    adapter = _qv_adapter(m, tmp_path)
    weights = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    merge_adapter(model, adapter, base_weights=weights)
    after = model.graph.initializers["qkv_proj.MatMul.weight"].const_value.numpy()
    assert after.dtype == np.float16
    np.testing.assert_array_equal(after[:, 8:16], before[:, 8:16])
    for name, cols in (("q_proj", slice(0, 8)), ("v_proj", slice(16, 24))):
        t = next(t for t in adapter if t.name.endswith(name))
        exact = before[:, cols].T.astype(np.float64) + t.scale * (t.B.astype(np.float64) @ t.A.astype(np.float64))
        got = after[:, cols].T
        assert not np.array_equal(got, before[:, cols].T)
        # Within half a float16 step of the exact value: one rounding (plus float32 noise far below it).
        half_ulp = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64) / 2
        assert (np.abs(got.astype(np.float64) - exact) <= half_ulp * (1 + 1e-3)).all()


def test_dora_merges_into_packed_slices(tmp_path):
    """DoRA's merged weight is per output row, and a slice holds whole rows: merge is exact."""
    torch.manual_seed(0)
    m = _Attn().eval()
    _genai_attn(m, tmp_path / "model.onnx")
    save_file({k: v.detach().numpy().copy() for k, v in m.state_dict().items()}, str(tmp_path / "w.st"))
    peft_model = peft_reference(m, r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "merged.onnx"
    code, _, err = _cli(
        "merge", tmp_path / "model.onnx", tmp_path / "adapter", "-o", out, "--base-weights", tmp_path / "w.st"
    )
    assert code == 0, err
    x = torch.randn(2, 8)
    assert _rel_err(run_plain(out, {"x": x.numpy()})[0], peft_model(x).detach().numpy()) <= 1e-5

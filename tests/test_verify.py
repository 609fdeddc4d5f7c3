"""verify: the post-merge gate. Identical models pass (exit 0), a perturbed weight fails (exit 1),
tolerances move the line, bad inputs exit 2 with one line; references can be saved and checked later."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lora_export import verify_models
from lora_export.cli import cli
from lora_export.errors import LoraExportError
from lora_export.runtime.verify import compare, random_inputs


def _model(path, *, perturb: float = 0.0, output_name: str = "logits", extra_input: bool = False):
    """Embedding (Gather) → MatMul, masked: symbolic batch/sequence, int64 ids and mask."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((100, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    w[0, 0] += perturb
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"]))
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["y", "m3"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", "sequence", 4])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def models(tmp_path):
    a = _model(tmp_path / "a.onnx")
    same = _model(tmp_path / "same.onnx")
    off = _model(tmp_path / "off.onnx", perturb=1e-2)
    return a, same, off


def _cli(*args):
    return CliRunner().invoke(cli, ["verify", *map(str, args)])


def test_identical_models_pass(models):
    a, same, _ = models
    report = verify_models(a, same)
    assert report.passed
    assert report.outputs[0].max_abs == 0.0 and report.outputs[0].shape == [2, 8, 4]
    assert report.inputs["input_ids"]["shape"] == [2, 8]
    json.dumps(report.to_dict())  # JSON-able
    res = _cli(a, same)
    assert res.exit_code == 0, res.output
    assert "agree" in res.stdout


def test_perturbed_weight_fails_with_exit_1(models):
    a, _, off = models
    report = verify_models(a, off)
    assert not report.passed
    assert 0 < report.outputs[0].max_abs < 1 and report.outputs[0].mismatched > 0
    res = _cli(a, off, "--json")
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["passed"] is False and data["outputs"][0]["allclose"] is False
    assert res.stderr.startswith("error: 1 of 1 output(s) differ") and res.stderr.count("\n") == 1


def test_tolerance_flags(models):
    a, _, off = models
    assert _cli(a, off, "--atol", "1").exit_code == 0
    assert _cli(a, off, "--rtol", "10", "--atol", "1e-3").exit_code == 0
    assert _cli(a, off, "--rtol", "1e-6", "--atol", "0").exit_code == 1


def test_random_inputs_follow_names_and_dims(models):
    a, same, _ = models
    report = verify_models(a, same, dims={"batch": 3, "sequence": 5}, seed=7)
    assert report.inputs["input_ids"]["shape"] == [3, 5]
    res = _cli(a, same, "--dim", "batch=1", "--dim", "sequence=4", "--json")
    assert json.loads(res.stdout)["outputs"][0]["shape"] == [1, 4, 4]

    class Spec:
        def __init__(self, name, type_, shape):
            self.name, self.type, self.shape = name, type_, shape

    feeds = random_inputs(
        [
            Spec("input_ids", "tensor(int64)", ["batch", "seq"]),
            Spec("attention_mask", "tensor(int64)", ["batch", "seq"]),
            Spec("token_type_ids", "tensor(int64)", ["batch", "seq"]),
            Spec("pixel_values", "tensor(float)", [None, 3, "s2", "s3"]),
        ],
        seed=0,
    )
    assert feeds["input_ids"].shape == (2, 8) and 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 100
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    assert feeds["pixel_values"].shape == (2, 3, 1, 1) and feeds["pixel_values"].dtype == np.float32
    again = random_inputs([Spec("input_ids", "tensor(int64)", ["batch", "seq"])], seed=0)
    np.testing.assert_array_equal(again["input_ids"], feeds["input_ids"])


def test_given_inputs(tmp_path, models):
    a, _, off = models
    ids = np.zeros((1, 3), dtype=np.int64)
    mask = np.zeros((1, 3), dtype=np.int64)  # everything masked: the perturbation cannot show
    np.savez(tmp_path / "x.npz", input_ids=ids, attention_mask=mask)
    assert _cli(a, off, "--inputs", tmp_path / "x.npz").exit_code == 0
    report = verify_models(a, off, inputs={"input_ids": ids, "attention_mask": np.ones_like(mask)})
    assert not report.passed and report.inputs["input_ids"]["source"] == "given"


def test_save_outputs_then_verify_against_references(tmp_path, models):
    a, same, off = models
    refs = tmp_path / "refs"
    res = _cli(a, "--save-outputs", refs)
    assert res.exit_code == 0, res.output
    assert (refs / "logits.npy").is_file() and (refs / "inputs.npz").is_file()
    ok = _cli(same, "--reference", refs / "logits.npy", "--inputs", refs / "inputs.npz")
    assert ok.exit_code == 0, ok.output
    bad = _cli(off, "--reference", refs / "logits.npy", "--inputs", refs / "inputs.npz")
    assert bad.exit_code == 1
    report = verify_models(same, [refs / "logits.npy"], inputs=refs / "inputs.npz")
    assert report.passed


@pytest.mark.parametrize(
    "case",
    ["missing", "corrupt", "output_names", "input_names", "bad_npz", "npz_names", "ref_count", "nothing", "dim"],
)
def test_bad_input_exits_2_with_one_line(tmp_path, models, case):
    a, same, _ = models
    if case == "missing":
        args = [a, tmp_path / "nope.onnx"]
    elif case == "corrupt":
        (tmp_path / "bad.onnx").write_bytes(b"not a model at all")
        args = [a, tmp_path / "bad.onnx"]
    elif case == "output_names":
        args = [a, _model(tmp_path / "renamed.onnx", output_name="scores")]
    elif case == "input_names":
        args = [a, _model(tmp_path / "more.onnx", extra_input=True)]
    elif case == "bad_npz":
        (tmp_path / "x.npz").write_bytes(b"garbage")
        args = [a, same, "--inputs", tmp_path / "x.npz"]
    elif case == "npz_names":
        np.savez(tmp_path / "x.npz", ids=np.zeros((1, 2), dtype=np.int64))
        args = [a, same, "--inputs", tmp_path / "x.npz"]
    elif case == "ref_count":
        np.save(tmp_path / "r1.npy", np.zeros(3))
        np.save(tmp_path / "r2.npy", np.zeros(3))
        args = [a, "--reference", tmp_path / "r1.npy", "--reference", tmp_path / "r2.npy"]
    elif case == "nothing":
        args = [a]
    else:
        args = [a, same, "--dim", "batch"]
    res = _cli(*args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.output


def test_compare_details():
    a = np.array([1.0, 2.0, np.nan], dtype=np.float32)
    c = compare("y", a, a.copy(), rtol=0, atol=0)
    assert c.allclose and c.max_abs == 0
    c = compare("y", a, np.array([1.0, 2.0, 3.0]), rtol=1, atol=1)
    assert not c.allclose and "NaN" in c.detail
    c = compare("y", np.zeros((2, 3)), np.zeros((3, 2)), rtol=1, atol=1)
    assert not c.allclose and "shape" in c.detail
    c = compare("y", np.array([1.0, 0.0]), np.array([1.1, 0.0]), rtol=0.0, atol=1e-5)
    assert abs(c.max_abs - 0.1) < 1e-9 and abs(c.max_rel - 0.1 / 1.1) < 1e-9
    with pytest.raises(LoraExportError):
        verify_models("a.onnx", "b.onnx", rtol=-1)

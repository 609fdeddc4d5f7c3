"""Issue 15, item 5: ``verify`` fits CI. A served adapter is checked against a merged model or reference
outputs; random token ids stay within the vocabulary; errors are summarized, never cut mid-word; a shape
mismatch reports no elementwise error. References are plain numpy (``polish_fixtures``)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from polish_fixtures import one_error_line, reference, run_cli
from robust_fixtures import VOCAB, tiny_model, write_adapter, write_model

import lora_export.graph.verbs.inspect as inspect_mod
from lora_export.cli import cli
from lora_export.errors import first_line, summarize


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """base (vocabulary 10), its adapter, the adapter injected (served/) and merged, a second adapter."""
    root = tmp_path_factory.mktemp("verify_ci")
    model, adapter = write_model(root / "base.onnx"), write_adapter(root / "ad")
    other = write_adapter(root / "other", b_value=-0.2)
    for cmd in (
        ["inject", model, adapter, "other=" + str(other), "-o", "served"],
        ["merge", model, adapter, "-o", "merged.onnx"],
    ):
        res = run_cli(*cmd, cwd=root)
        assert res.returncode == 0, res.stderr
    return root


def test_served_adapter_checked_against_the_merged_model(work):
    res = run_cli(
        "verify", "served/model.onnx", "merged.onnx", "--adapter", "served/ad.onnx_adapter", cwd=work, subprocess_=True
    )
    assert res.returncode == 0, res.stderr
    assert "agree" in res.stdout
    # Another adapter, or none, is caught: the check compares what is served.
    for extra in (["--adapter", "served/other.onnx_adapter"], []):
        res = run_cli("verify", "served/model.onnx", "merged.onnx", *extra, cwd=work)
        assert res.returncode == 1, (extra, res.stdout, res.stderr)
        assert "differ" in res.stderr


def test_served_adapter_checked_against_reference_outputs(work, tmp_path):
    ids = np.random.default_rng(11).integers(0, VOCAB, 3)
    np.savez(tmp_path / "inputs.npz", ids=ids)
    np.save(tmp_path / "y.npy", reference(ids, work / "ad").astype(np.float32))
    for adapter, code in (("served/ad.onnx_adapter", 0), (str(work / "ad"), 0), ("served/other.onnx_adapter", 1)):
        res = run_cli(
            "verify", "served/model.onnx", "--adapter", adapter, "--inputs", tmp_path / "inputs.npz",
            "--reference", tmp_path / "y.npy", "--json", cwd=work,
        )  # fmt: skip
        assert res.returncode == code, (adapter, res.stdout, res.stderr)
        report = json.loads(res.stdout)
        assert report["passed"] is (code == 0) and report["adapter"] == adapter


def test_adapter_needs_an_injected_model(work):
    line = one_error_line(
        run_cli("verify", "base.onnx", "merged.onnx", "--adapter", "served/ad.onnx_adapter", cwd=work)
    )
    assert "not an injected model" in line


def test_random_token_ids_stay_within_the_vocabulary(work, tmp_path):
    # A vocabulary of 10: ids drawn over [0, 100) made ONNX Runtime fail before any comparison.
    res = run_cli("verify", "base.onnx", "merged.onnx", "--save-outputs", tmp_path / "saved", cwd=work)
    assert res.returncode == 1, res.stderr  # the merge changed the outputs: the inputs were valid
    ids = np.load(tmp_path / "saved" / "inputs.npz")["ids"]
    assert ids.min() >= 0 and ids.max() < VOCAB
    y = np.load(tmp_path / "saved" / "y.npy")
    np.testing.assert_allclose(y, reference(ids), rtol=1e-5, atol=1e-5)
    res = run_cli("verify", "served/model.onnx", "merged.onnx", "--adapter", "served/ad.onnx_adapter",
                  "--seed", "4", "--json", cwd=work)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["inputs"]["ids"]["source"] == "random"


def test_table_of_unknown_size_asks_for_inputs(tmp_path):
    # The ids index a table that is itself an input: its size is not in the graph.
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("table", TensorProto.FLOAT, ["rows", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    line = one_error_line(run_cli("verify", path, path, cwd=tmp_path))
    assert "'ids'" in line and "--inputs" in line
    np.savez(tmp_path / "in.npz", table=np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32),
             ids=np.array([4, 0, 2]))  # fmt: skip
    res = run_cli("verify", path, path, "--inputs", tmp_path / "in.npz", cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_out_of_range_ids_are_reported_whole(work, tmp_path):
    np.savez(tmp_path / "bad.npz", ids=np.array([1, 2, 100]))
    line = one_error_line(run_cli("verify", "base.onnx", "merged.onnx", "--inputs", tmp_path / "bad.npz", cwd=work))
    # ONNX Runtime's whole message, up to the range it states.
    assert "idx=100" in line and "[-10,9]" in line


def test_shape_mismatch_reports_no_error_figure(work, tmp_path):
    np.save(tmp_path / "y.npy", np.zeros((2, 2), np.float32))
    res = run_cli("verify", "base.onnx", "--reference", tmp_path / "y.npy", cwd=work)
    line = one_error_line(res, code=1)
    assert "shape mismatch" in line and "max abs error" not in line
    assert "shape mismatch: [3, 4] vs reference [2, 2]" in res.stdout


# -- never cut mid-word ---------------------------------------------------------------------------

WORDS = [f"word{i:03d}" for i in range(120)]


def _whole_words(line: str, words: list[str]) -> None:
    shown = re.findall(r"word\d+", line)
    assert shown and all(w in words for w in shown), shown
    assert shown == words[: len(shown)]
    if len(shown) < len(words):
        assert line.endswith(f"... ({len(words) - len(shown)} more words)"), line


def test_summarize_keeps_whole_words():
    text = " ".join(WORDS)
    out = summarize(text, 100)
    assert len(out) < 140
    _whole_words(out, WORDS)
    assert summarize("short message", 100) == "short message"
    long_word = "x" * 500
    assert summarize(f"{long_word} tail", 100) == f"{long_word} ... (1 more word)"
    assert first_line(RuntimeError("\n".join([text, "second line"]))).startswith("word000 word001")


def test_cli_safety_net_summarizes_long_messages(monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError(" ".join(WORDS))

    monkeypatch.setattr(inspect_mod, "inspect_model", boom)
    res = CliRunner().invoke(cli, ["inspect", "m.onnx"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    line = res.stderr.strip()
    assert line.startswith("error: internal error: RuntimeError: word000")
    _whole_words(line.split(" (please report")[0], WORDS)


def test_tiny_model_is_the_reference_model():
    # The reference in polish_fixtures describes the fixture's graph: three weights, vocabulary VOCAB.
    names = [t.name for t in tiny_model().graph.initializer]
    assert names == ["emb.weight", "fc.weight", "fc.bias", "proj.weight"] and VOCAB == 10


def test_long_lists_say_how_many_more(tmp_path):
    model, adapter = write_model(tmp_path / "m" / "model.onnx"), write_adapter(tmp_path / "ad")
    others = [{"filename": f"part{i}.onnx"} for i in range(5)]
    config = {"model": {"decoder": {"filename": "model.onnx"}, "pipeline": others}}
    (tmp_path / "m" / "genai_config.json").write_text(json.dumps(config))
    line = one_error_line(run_cli("inject", model, adapter, "-o", "out", cwd=tmp_path))
    assert "part0.onnx, part1.onnx, part2.onnx, ... (2 more)" in line

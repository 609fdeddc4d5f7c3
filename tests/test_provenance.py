"""Provenance: merge and inject record what they did in the model (lora_export.history), a second merge
of the same adapter is refused unless forced, and inspect shows history, slots and full tensors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from conftest import peft_reference
from onnx_fixtures import export_onnx, run_onnx
from torch import nn

import lora_export
from lora_export import Adapter, LoraConfig, LoraTarget, load_adapter, merge_adapter, merge_file, save_adapter_files
from lora_export.cli import cli
from lora_export.core.adapter import adapter_digest, target_digest
from lora_export.errors import AdapterError, ModelError
from lora_export.graph.model.model_io import load_model, save_model
from lora_export.graph.model.provenance import (
    HISTORY_KEY,
    UNREADABLE_KEY,
    HistoryError,
    append_history,
    make_record,
    read_history,
    record_problem,
)
from lora_export.graph.verbs.inject import inject_files
from lora_export.graph.verbs.inspect import format_report, inspect_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 12)
        self.out = nn.Linear(12, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(ids))))


def _inputs(seed: int) -> dict:
    return {"ids": torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(seed))}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small net exported inline and with external data, and two PEFT adapters (a, b) for it."""
    root = tmp_path_factory.mktemp("provenance")
    torch.manual_seed(0)
    net = Net().eval()
    base = export_onnx(net, _inputs(0), root / "base.onnx", dynamo=False)
    (root / "ext").mkdir()
    ext = export_onnx(net, _inputs(0), root / "ext" / "base.onnx", dynamo=False, external=True)
    adapters = {}
    for seed, (name, targets) in enumerate({"a": ["fc", "out"], "b": ["emb", "fc"]}.items(), 3):
        peft_model = peft_reference(net, seed=seed, r=2, lora_alpha=4, target_modules=targets)
        peft_model.save_pretrained(root / name)
        adapters[name] = root / name
    return {"root": root, "net": net, "base": base, "ext": ext, **adapters}


def _cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f.lower() in lines[0].lower(), lines[0]


def _history(path: Path) -> list[dict]:
    return read_history(load_model(path))


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _with_metadata(src: Path, dst: Path, value: str) -> Path:
    """A copy of the (inline) model ``src`` whose history metadata is ``value``."""
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    props[HISTORY_KEY] = value
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(dst))
    return dst


# -- the digest ------------------------------------------------------------------------------------


def _toy(**changes) -> Adapter:
    rng = np.random.default_rng(0)
    t = LoraTarget("fc", "linear", rng.standard_normal((2, 16)).astype(np.float32), np.ones((12, 2), np.float32), 2.0)
    u = LoraTarget("out", "linear", np.ones((2, 12), np.float32), np.ones((6, 2), np.float32), 2.0)
    fields = {"targets": {"fc": t, "out": u}, "config": LoraConfig(r=2, target_modules=["fc", "out"])}
    return Adapter(**{**fields, **changes})


def test_digest_is_stable_and_sees_every_tensor():
    a = _toy()
    d = adapter_digest(a)
    assert len(d) == 64 and int(d, 16) >= 0 and a.digest() == d
    # Order, name and stored base weights do not change it: the same tensors are the same adapter.
    same = _toy(targets=dict(reversed(list(a.targets.items()))), name="other")
    same.stored_base["fc"] = np.zeros((12, 16), np.float32)
    assert adapter_digest(same) == d
    fc = a.targets["fc"]
    changed_a = fc.A.copy()
    changed_a[0, 0] = np.nextafter(changed_a[0, 0], np.float32(np.inf))
    variants = [
        {"targets": {**a.targets, "fc": dataclasses.replace(fc, A=changed_a)}},
        {"targets": {**a.targets, "fc": dataclasses.replace(fc, scale=2.5)}},
        {"targets": {**a.targets, "fc": dataclasses.replace(fc, A=fc.A.astype(np.float16))}},
        {"targets": {**a.targets, "fc": dataclasses.replace(fc, magnitude=np.ones(12, np.float32))}},
        {"targets": {"fc": fc}},
        {"extra": {"fc.bias": np.zeros(12, np.float32)}},
    ]
    digests = {adapter_digest(_toy(**v)) for v in variants}
    assert d not in digests and len(digests) == len(variants)
    assert adapter_digest(a.scaled(2.0)) != d
    # Byte order and memory layout are canonical: a big-endian or Fortran-order copy hashes the same.
    big = dataclasses.replace(fc, A=fc.A.astype(">f4"), B=np.asfortranarray(fc.B))
    assert adapter_digest(_toy(targets={**a.targets, "fc": big})) == d
    assert target_digest(big) == target_digest(fc) != target_digest(dataclasses.replace(fc, name="other"))
    assert target_digest(fc) != target_digest(a.targets["out"])


def test_digest_of_a_peft_adapter_does_not_depend_on_its_folder(files, tmp_path):
    shutil.copytree(files["a"], tmp_path / "renamed")
    assert load_adapter(tmp_path / "renamed").digest() == load_adapter(files["a"]).digest()
    assert load_adapter(files["b"]).digest() != load_adapter(files["a"]).digest()


# -- merge records -----------------------------------------------------------------------------------


def test_merge_records_what_was_done(files, tmp_path):
    report = merge_file(files["base"], files["a"], tmp_path / "m.onnx", scale=0.5)
    history = _history(tmp_path / "m.onnx")
    assert history == report.history and len(history) == 1
    rec = history[0]
    assert rec["operation"] == "merge" and rec["adapter"] == "a" and rec["scale"] == 0.5
    assert rec["adapter_sha256"] == load_adapter(files["a"]).digest() == report.adapter_sha256
    assert rec["version"] == lora_export.__version__ and rec["tool"] == "lora-export"
    written = {m["target"]: m["initializer"] for m in report.merged}
    assert {t["target"]: (t["status"], t["initializer"]) for t in rec["targets"]} == {
        name: ("matched", init) for name, init in written.items()
    }
    assert "forced" not in rec and record_problem(rec) is None
    # Nothing machine-, time- or path-dependent.
    text = load_model(tmp_path / "m.onnx").metadata_props[HISTORY_KEY]
    assert str(tmp_path) not in text and "time" not in text


def test_second_adapter_appends(files, tmp_path):
    merge_file(files["base"], files["a"], tmp_path / "m1.onnx")
    merge_file(tmp_path / "m1.onnx", files["b"], tmp_path / "m2.onnx")
    history = _history(tmp_path / "m2.onnx")
    assert [(r["operation"], r["adapter"]) for r in history] == [("merge", "a"), ("merge", "b")]
    assert history[0] == _history(tmp_path / "m1.onnx")[0]


def test_skipped_targets_are_recorded(files, tmp_path):
    a = load_adapter(files["a"])
    ghost = dataclasses.replace(a.targets["fc"], name="nowhere")
    partial = dataclasses.replace(a, targets={**a.targets, "nowhere": ghost})
    model = load_model(files["base"])
    merge_adapter(model, partial, allow_partial=True)
    statuses = {t["target"]: t["status"] for t in read_history(model)[0]["targets"]}
    assert statuses == {"fc": "matched", "out": "matched", "nowhere": "skipped"}
    assert read_history(model)[0]["targets"][-1]["initializer"] is None


def test_odd_adapter_names_are_stored(files, tmp_path):
    # A folder name that is not valid UTF-8 (a lone surrogate in Python) or not ASCII still saves.
    model = load_model(files["base"])
    for name in ("a\udcff", "ädäptér"):
        merge_adapter(model, dataclasses.replace(load_adapter(files[{"a\udcff": "a"}.get(name, "b")]), name=name))
    save_model(model, tmp_path / "m.onnx")
    assert [r["adapter"] for r in _history(tmp_path / "m.onnx")] == ["a\udcff", "ädäptér"]


def test_merge_is_byte_deterministic(files, tmp_path):
    for base in ("base", "ext"):
        for d in ("x", "y"):
            merge_file(files[base], files["a"], tmp_path / d / base / "m.onnx")
        got = {d: sorted((tmp_path / d / base).iterdir()) for d in ("x", "y")}
        assert [p.name for p in got["x"]] == [p.name for p in got["y"]]
        for px, py in zip(got["x"], got["y"]):
            assert px.read_bytes() == py.read_bytes(), px.name


# -- merging the same adapter twice ---------------------------------------------------------------


def test_double_merge_refused_then_forced(files, tmp_path):
    merged = tmp_path / "m.onnx"
    assert _cli("merge", files["ext"], files["a"], "-o", merged).exit_code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _cli("merge", merged, files["a"], "-o", tmp_path / "twice.onnx")
    _one_line_error(result, "already merged", "--force", "history record 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    # The same tensors under another folder name are the same adapter.
    shutil.copytree(files["a"], tmp_path / "copy")
    _one_line_error(_cli("merge", merged, tmp_path / "copy", "-o", tmp_path / "twice.onnx"), "already merged")
    with pytest.raises(AdapterError, match="--force"):
        merge_adapter(load_model(merged), load_adapter(files["a"]))

    result = _cli("merge", merged, files["a"], "-o", tmp_path / "twice.onnx", "--force", "--json")
    assert result.exit_code == 0, result.output
    history = _history(tmp_path / "twice.onnx")
    assert [r["adapter"] for r in history] == ["a", "a"] and history[1]["forced"] is True
    assert json.loads(result.stdout)["history"] == history
    assert json.loads(result.stdout)["repeated"].startswith("adapter 'a' is already merged")
    # W₀ + ΔW + ΔW == W₀ + 2·ΔW (up to one extra float32 rounding).
    assert _cli("merge", files["ext"], files["a"], "-o", tmp_path / "scale2.onnx", "--scale", "2").exit_code == 0
    inputs = _inputs(7)
    twice, scale2 = run_onnx(tmp_path / "twice.onnx", inputs), run_onnx(tmp_path / "scale2.onnx", inputs)
    once = run_onnx(merged, inputs)
    assert np.abs(twice - once).max() > 1e-3  # the second merge did change the model
    np.testing.assert_allclose(twice, scale2, rtol=1e-5, atol=1e-6)
    w_twice, w_scale2 = _weights(tmp_path / "twice.onnx"), _weights(tmp_path / "scale2.onnx")
    assert w_twice.keys() == w_scale2.keys()
    for name in w_twice:
        np.testing.assert_allclose(w_twice[name], w_scale2[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_part_of_a_merged_adapter_is_refused_too(files, tmp_path):
    """--only-targets: disjoint parts merge one after the other; a part merged again is refused."""
    merge_file(files["base"], files["a"], tmp_path / "fc.onnx", only_targets="^fc$")
    merge_file(tmp_path / "fc.onnx", files["a"], tmp_path / "both.onnx", only_targets="^out$")
    history = _history(tmp_path / "both.onnx")
    assert [[t["target"] for t in r["targets"]] for r in history] == [["fc"], ["out"]]
    a = load_adapter(files["a"])
    assert history[0]["targets"][0]["sha256"] == target_digest(a.targets["fc"])
    again = [("both.onnx", []), ("fc.onnx", []), ("both.onnx", ["--only-targets", "out"])]
    for model, args in again:
        result = _cli("merge", tmp_path / model, files["a"], "-o", tmp_path / "again.onnx", *args)
        _one_line_error(result, "already merged", "--force")
    assert "target fc" in _cli("merge", tmp_path / "fc.onnx", files["a"], "-o", tmp_path / "x.onnx").stderr
    result = _cli("merge", tmp_path / "fc.onnx", files["a"], "-o", tmp_path / "again.onnx", "--force")
    assert result.exit_code == 0, result.output
    assert _history(tmp_path / "again.onnx")[-1]["forced"] is True
    assert "note: adapter 'a': target fc already merged" in result.stdout
    assert json.loads(_cli("inspect", tmp_path / "fc.onnx", files["a"], "--json").stdout)["already_merged"] == [1]


def test_another_adapter_into_a_merged_model_is_allowed(files, tmp_path):
    merge_file(files["base"], files["a"], tmp_path / "m.onnx")
    result = _cli("merge", tmp_path / "m.onnx", files["b"], "-o", tmp_path / "mb.onnx")
    assert result.exit_code == 0, result.output


# -- inject records ------------------------------------------------------------------------------------


def test_inject_records_each_adapter(files, tmp_path):
    result = inject_files(files["base"], [files["a"], files["b"]], tmp_path / "served")
    history = _history(tmp_path / "served" / "model.onnx")
    assert history == result.history
    assert [(r["operation"], r["adapter"], r["scale"]) for r in history] == [("inject", "a", 1.0), ("inject", "b", 1.0)]
    for rec, name in zip(history, ("a", "b")):
        assert rec["adapter_sha256"] == load_adapter(files[name]).digest() == result.digests[name]
        slots = result.manifest.slots
        assert all(t["status"] == "matched" and t["initializer"] == slots[t["target"]].weight for t in rec["targets"])
    # Determinism: the same inject into another folder writes the same bytes.
    inject_files(files["base"], [files["a"], files["b"]], tmp_path / "again")
    for name in ("model.onnx", "a.onnx_adapter", "b.safetensors"):
        assert (tmp_path / "served" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_inject_into_a_merged_model_appends(files, tmp_path):
    merge_file(files["base"], files["a"], tmp_path / "m.onnx")
    inject_files(tmp_path / "m.onnx", [files["b"]], tmp_path / "served")
    history = _history(tmp_path / "served" / "model.onnx")
    assert [(r["operation"], r["adapter"]) for r in history] == [("merge", "a"), ("inject", "b")]


# -- inspect ---------------------------------------------------------------------------------------------


def test_inspect_plain_model(files):
    report = inspect_model(files["base"])
    assert report["history"] == [] and "slots" not in report
    assert "history: none" in format_report(report)


def test_inspect_merged_model(files, tmp_path):
    merge_file(files["base"], files["a"], tmp_path / "m.onnx")
    merge_file(tmp_path / "m.onnx", files["a"], tmp_path / "m2.onnx", force=True, scale=0.25)
    res = _cli("inspect", tmp_path / "m2.onnx", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["history"] == _history(tmp_path / "m2.onnx") and len(data["history"]) == 2
    res = _cli("inspect", tmp_path / "m2.onnx")
    assert res.exit_code == 0, res.output
    digest = load_adapter(files["a"]).digest()
    assert "history: 2 record(s)" in res.stdout and digest[:12] in res.stdout
    assert "merge (forced)" in res.stdout and "0.25" in res.stdout and "2 matched" in res.stdout
    # With the adapter: inspect says it is merged already.
    res = _cli("inspect", tmp_path / "m.onnx", files["a"], "--json")
    assert json.loads(res.stdout)["already_merged"] == [1]
    res = _cli("inspect", tmp_path / "m.onnx", files["a"])
    assert "already merged into this model (history record 1)" in res.stdout


def test_inspect_injected_model_shows_slots_not_defaults(files, tmp_path):
    inject_files(files["base"], [files["a"], files["b"]], tmp_path / "served")
    served = tmp_path / "served" / "model.onnx"
    report = inspect_model(served)
    slots = {s["module"]: s for s in report["slots"]}
    assert set(slots) == {"emb", "fc", "out"}
    assert slots["fc"]["rank_dim"] == "fc.rank" and slots["fc"]["dora"] is False and slots["fc"]["dtype"] == "float32"
    assert slots["emb"]["op"] == "Gather" and slots["fc"]["inputs"] == ["fc.lora_A", "fc.lora_B"]
    # The slot inputs (rank-0 defaults) and branch nodes are no targetable weights: the base's rows remain.
    plain = inspect_model(files["base"])["targetable"]
    rows = report["targetable"]
    assert [r["initializer"] for r in rows] == [r["initializer"] for r in plain]
    assert [r["shared_by"] for r in rows] == [r["shared_by"] for r in plain]
    assert {s["weight"] for s in slots.values()} <= {r["initializer"] for r in rows}
    res = _cli("inspect", served)
    assert res.exit_code == 0, res.output
    assert "3 LoRA slot(s)" in res.stdout and "fc.rank" in res.stdout and "lora_A" not in res.stdout
    assert "history: 2 record(s)" in res.stdout and "inject" in res.stdout
    assert json.loads(_cli("inspect", served, "--json").stdout)["slots"] == report["slots"]


def test_inspect_injected_dora_slot(files, tmp_path):
    inject_files(files["base"], [files["a"]], tmp_path / "served", dora=True)
    report = inspect_model(tmp_path / "served" / "model.onnx")
    assert all(s["dora"] for s in report["slots"])
    assert all(not r["initializer"].endswith(".dora_scale") for r in report["targetable"])
    assert "  yes  " in format_report(report)


def test_inspect_shows_full_replacement_tensors_in_text(files, tmp_path):
    a = load_adapter(files["a"])
    extra = {"fc.bias": np.full(12, 0.5, np.float32), "head.weight": np.zeros((3, 3), np.float32)}
    save_adapter_files(dataclasses.replace(a, extra=extra), tmp_path / "with_extra")
    res = _cli("inspect", files["base"], tmp_path / "with_extra")
    assert res.exit_code == 0, res.output
    assert "full replacement tensors: 2 (1 resolve)" in res.stdout
    lines = {ln.split()[0]: ln for ln in res.stdout.splitlines() if ln.split() and ln.split()[0] in extra}
    assert "matched" in lines["fc.bias"] and "unmatched" in lines["head.weight"]
    data = json.loads(_cli("inspect", files["base"], tmp_path / "with_extra", "--json").stdout)
    assert {e["tensor"]: e["status"] for e in data["extras"]} == {"fc.bias": "matched", "head.weight": "unmatched"}
    # Merged (--allow-partial: head.weight is nowhere), the record lists them with their status.
    report = merge_file(files["base"], tmp_path / "with_extra", tmp_path / "m.onnx", allow_partial=True)
    (rec,) = _history(tmp_path / "m.onnx")
    assert rec["adapter_sha256"] != a.digest()
    fc_bias = next(r["initializer"] for r in report.replaced if r["tensor"] == "fc.bias")
    assert rec["extras"] == [
        {"tensor": "fc.bias", "status": "matched", "initializer": fc_bias},
        {"tensor": "head.weight", "status": "skipped", "initializer": None},
    ]


# -- malformed history -------------------------------------------------------------------------------

BAD = {
    "not-json": "{not json",
    "object": '{"operation": "merge"}',
    "deep": "[" * 100000 + "]" * 100000,
    "record": '[{"operation": "merge"}]',
    "status": json.dumps(
        [
            {
                "operation": "merge",
                "adapter": "x",
                "adapter_sha256": "0" * 64,
                "scale": 1,
                "version": "0",
                "targets": [{"target": "fc", "status": "weird", "initializer": None}],
            }
        ]
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_malformed_history_is_one_line(files, tmp_path, kind):
    model = _with_metadata(files["base"], tmp_path / "bad.onnx", BAD[kind])
    with pytest.raises(HistoryError, match="corrupt lora_export.history"):
        read_history(load_model(model))
    result = _cli("merge", model, files["a"], "-o", tmp_path / "m.onnx")
    _one_line_error(result, "lora_export.history", "--force")
    assert not (tmp_path / "m.onnx").exists()
    # inspect notes it and still describes the model.
    res = _cli("inspect", model)
    assert res.exit_code == 0, res.output
    assert "history: unreadable (corrupt lora_export.history" in res.stdout
    data = json.loads(_cli("inspect", model, "--json").stdout)
    assert data["history"] is None and "corrupt" in data["history_error"]


def test_corrupt_slot_manifest_is_one_line(files, tmp_path):
    inject_files(files["base"], [files["a"]], tmp_path / "served")
    proto = onnx.load(str(tmp_path / "served" / "model.onnx"))
    for p in proto.metadata_props:
        if p.key == "lora_export.slots":
            p.value = '{"slots": [{"module": 1}]}'
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    _one_line_error(_cli("inspect", tmp_path / "bad.onnx"), "corrupt lora_export.slots")


def test_forced_merge_and_inject_keep_an_unreadable_history_aside(files, tmp_path):
    model = _with_metadata(files["base"], tmp_path / "bad.onnx", "{not json")
    assert _cli("merge", model, files["a"], "-o", tmp_path / "m.onnx", "--force").exit_code == 0
    merged = load_model(tmp_path / "m.onnx")
    assert merged.metadata_props[UNREADABLE_KEY] == "{not json"
    assert [r["adapter"] for r in read_history(merged)] == ["a"] and "forced" not in read_history(merged)[0]
    inject_files(model, [files["b"]], tmp_path / "served")
    served = load_model(tmp_path / "served" / "model.onnx")
    assert served.metadata_props[UNREADABLE_KEY] == "{not json"
    assert [r["operation"] for r in read_history(served)] == ["inject"]


def test_record_validation():
    good = make_record("merge", "a", "ab" * 32, targets=[{"target": "fc", "status": "matched", "initializer": "w"}])
    assert record_problem(good) is None
    for key, value in [
        ("operation", "fold"),
        ("adapter", 3),
        ("adapter_sha256", "xyz"),
        ("scale", "1"),
        ("scale", True),
        ("targets", {}),
        ("targets", [{"status": "matched"}]),
        ("extras", [{"tensor": "b", "status": "matched", "initializer": 5}]),
    ]:
        assert record_problem({**good, key: value}), (key, value)
    # append_history refuses a bad record (a bug, never stored).
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=8)
    with pytest.raises(ValueError):
        append_history(model, [{**good, "scale": "x"}])
    assert HISTORY_KEY not in model.metadata_props
    append_history(model, [good])
    append_history(model, [good])
    assert read_history(model) == [good, good]
    assert isinstance(HistoryError("x"), ModelError)

"""The serve plugin's pure parts, without Ray: request parsing, the adapter catalog, the micro-batcher."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from lora_export_plugins.serve.batcher import Batcher, concat, split
from lora_export_plugins.serve.catalog import Catalog, scan
from lora_export_plugins.serve.protocol import BadRequest, parse_run, to_feeds

INPUTS = {"ids": ("tensor(int64)", ["batch", 6]), "x": ("tensor(float)", ["batch", 6, 3])}


def _ok(rows=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, 50, (rows, 6)).tolist(), "x": rng.standard_normal((rows, 6, 3)).tolist()}


def test_feeds_keep_values_and_dtypes():
    raw = _ok()
    feeds = to_feeds(raw, INPUTS)
    assert feeds["ids"].dtype == np.int64 and feeds["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds["ids"], np.array(raw["ids"]))
    np.testing.assert_array_equal(feeds["x"], np.array(raw["x"], dtype=np.float32))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("x"), "missing input"),
        (lambda d: d.update(y=[[1]]), "unknown input"),
        (lambda d: d.update(ids=[[0.5] * 6] * 2), "integers"),
        (lambda d: d.update(ids=[[1] * 5] * 2), "dimension 1 must be 6"),
        (lambda d: d.update(ids=[1] * 6), "rank"),
        (lambda d: d.update(ids=[[1] * 6, [1] * 5]), "rectangular"),
        (lambda d: d.update(ids=[["a"] * 6] * 2), "numbers only"),
        (lambda d: d.update(ids=[[2**63] * 6] * 2), "outside int64"),
        (lambda d: d.update(ids=[[1] * 6] * 3), "batch size"),
        (lambda d: d.update(x=[[[float("nan")] * 3] * 6] * 2), "non-finite"),
    ],
)
def test_bad_inputs_are_one_line_400s(change, message):
    raw = _ok()
    change(raw)
    with pytest.raises(BadRequest, match=message) as e:
        to_feeds(raw, INPUTS)
    assert "\n" not in str(e.value) and e.value.status == 400


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'{"inputs": 3}', b'{"adapter": 3, "inputs": {}}', b'{"adapter": "", "inputs": {}}',
     b'{"inputs": {}, "extra": 1}', b"[" * 100000],
)  # fmt: skip
def test_malformed_bodies_are_400s(body):
    with pytest.raises(BadRequest):
        parse_run(body)


def test_parse_run_says_whether_the_body_named_an_adapter():
    assert parse_run(b'{"inputs": {}}') == (None, False, {})
    assert parse_run(b'{"adapter": null, "inputs": {}}') == (None, True, {})
    assert parse_run(json.dumps({"adapter": "a", "inputs": {"k": [1]}}).encode()) == ("a", True, {"k": [1]})


def test_catalog_finds_files_and_peft_folders_and_new_drops(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a.onnx_adapter").write_bytes(b"x")
    (one / ".lora-export-tmp.onnx_adapter").write_bytes(b"x")  # staging entries are never adapters
    (one / "model.onnx").write_bytes(b"x")
    (two / "a.safetensors").write_bytes(b"x")  # an earlier folder wins a name
    (two / "p").mkdir()
    (two / "p" / "adapter_config.json").write_text("{}")
    (two / "q").mkdir()  # no config: not an adapter
    assert scan([one, two]) == {"a": one / "a.onnx_adapter", "p": two / "p"}
    catalog = Catalog([one, two], ttl=3600)
    assert catalog.names() == ["a", "p"]
    (two / "late.onnx_adapter").write_bytes(b"x")
    assert catalog.source("late") == two / "late.onnx_adapter"  # a miss rescans
    assert catalog.source("../one/a") is None


def _fake_run(calls):
    def run(items):
        calls.append([a for a, _ in items])
        time.sleep(0.01)
        feeds, rows, counts = concat(items)
        # each row's output tags its adapter, so a mix-up would show
        tag = np.array([hash(r) % 1000 for r in rows], dtype=np.float64)
        return split([feeds["x"].sum(axis=(1, 2)) + tag], counts)

    return run


@pytest.mark.parametrize("mixed", [True, False])
def test_batcher_groups_requests_and_routes_each_row_back(mixed):
    calls: list = []
    batcher = Batcher(_fake_run(calls), max_rows=8, wait_s=0.05, mixed=mixed)
    rng = np.random.default_rng(1)
    requests = [("a" if i % 2 else None, {"x": rng.standard_normal((1 + i % 2, 6, 3))}) for i in range(10)]

    async def main():
        return await asyncio.gather(*(batcher.submit(a, f) for a, f in requests))

    results = asyncio.run(main())
    for (adapter, feeds), (out,) in zip(requests, results):
        np.testing.assert_allclose(out, feeds["x"].sum(axis=(1, 2)) + hash(adapter) % 1000)
    assert len(calls) < len(requests) and max(batcher.group_rows) <= 8
    if not mixed:
        assert all(len(set(c)) == 1 for c in calls)
    else:
        assert any(len(set(c)) > 1 for c in calls)


def test_batcher_passes_a_failure_to_every_request_of_its_group():
    def fail(items):
        raise RuntimeError("boom")

    batcher = Batcher(fail, max_rows=4, wait_s=0.01, mixed=True)

    async def main():
        return await asyncio.gather(*(batcher.submit(None, {"x": np.ones((1, 2))}) for _ in range(3)),
                                    return_exceptions=True)  # fmt: skip

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))

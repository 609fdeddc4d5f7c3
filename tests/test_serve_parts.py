"""The serve plugin's pure parts, without Ray: request parsing, response encoding, the adapter catalog, the
micro-batcher."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from lora_export_plugins.serve import encode
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


def test_batcher_runs_one_group_at_a_time_and_queues_the_next_requests_into_one():
    calls: list = []
    running = [0, 0]  # now, most at once

    def run(items):
        running[0] += 1
        running[1] = max(running)
        time.sleep(0.05)
        running[0] -= 1
        calls.append(len(items))
        return [[f["x"] * 2] for _, f in items]

    batcher = Batcher(run, max_rows=8, wait_s=0.0, mixed=True)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 4)) for _ in range(6)]

    async def main():
        first = asyncio.ensure_future(batcher.submit("a", {"x": xs[0]}))
        await asyncio.sleep(0.01)  # the first group is running: the next five wait for it, together
        rest = [batcher.submit(f"b{i}", {"x": x}) for i, x in enumerate(xs[1:])]
        return await asyncio.gather(first, *rest)

    for x, (out,) in zip(xs, asyncio.run(main())):
        np.testing.assert_array_equal(out, x * 2)
    assert calls == [1, 5] and running[1] == 1


@pytest.fixture(params=["orjson", "fallback"])
def encoder(request, monkeypatch):
    if request.param == "orjson":
        pytest.importorskip("orjson")
    else:
        monkeypatch.setattr(encode, "_orjson", None)
    return encode


def test_response_bodies_carry_every_value_exactly(encoder):
    rng = np.random.default_rng(4)
    scale = np.float32(10.0) ** rng.integers(-30, 30, (2, 3, 40)).astype(np.float32)
    values = [
        rng.standard_normal((2, 40)).astype(np.float32),
        (rng.standard_normal((2, 3, 40)).astype(np.float32) * scale).astype(np.float32),
        np.array([[1.0, -0.0, 123456792.0, 3e9, -2.5]], np.float32),  # whole numbers stay floats
        rng.standard_normal((3, 5)).astype(np.float16),
        rng.standard_normal((2, 4)),
        rng.integers(-(2**40), 2**40, (2, 3)),
        rng.standard_normal((2, 2)) > 0,
        np.array([[np.nan, np.inf, 1.5]], np.float32),  # as Python's json spells them
        np.zeros((2, 0), np.float32),
    ]
    names = [f"out{i}" for i in range(len(values))]
    body = json.loads(encoder.outputs_body(names, values))
    reference = json.loads(json.dumps({"outputs": {n: v.tolist() for n, v in zip(names, values)}}))
    assert list(body) == ["outputs"] and list(body["outputs"]) == names
    for n, v in zip(names, values):
        got = body["outputs"][n]
        assert np.asarray(got).dtype == np.asarray(reference["outputs"][n]).dtype  # floats stay floats
        np.testing.assert_array_equal(np.array(got, dtype=v.dtype), v)

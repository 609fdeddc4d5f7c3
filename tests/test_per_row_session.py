"""``LoraSession`` over a per-row model: adapters= per row, a resident pool loaded and freed at run time,
a full pool (error or LRU), unknown adapters, concurrency, ``convert`` for later adapters, ``inspect``.

References: PEFT with each row's adapter alone; rows without adapter: the base ONNX model."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest
from models import tiny_llama
from per_row_fixtures import cli_run, export_with_past, feeds, rel, saved_peft_adapters, step_inputs, torch_step

from lora_export.errors import AdapterError
from lora_export.graph.verbs.convert import convert_adapter
from lora_export.runtime.session import LoraSession

ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "v8": dict(r=8, lora_alpha=8, target_modules=["v_proj"], use_rslora=True),
    "qo": dict(r=2, lora_alpha=5, target_modules=["q_proj", "o_proj"]),
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A per-row model injected with "qv" only (the slots: q, v, o); "v8" and "qo" come later."""
    root = tmp_path_factory.mktemp("per-row-session")
    base, _ = tiny_llama()
    export_with_past(base, root / "base.onnx")
    peft = saved_peft_adapters(root, base, ADAPTERS, seed=70)
    code, _, err = cli_run(
        "inject", root / "base.onnx", f"qv={root / 'qv'}", root / "qo", "-o", root / "out", "--per-row"
    )
    assert code == 0, err
    inputs = step_inputs(4, 3, 1, seed=21)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    base_out = ort.InferenceSession(str(root / "base.onnx"), so).run(None, feeds(inputs))
    refs = {
        name: [torch_step(p, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(4)]
        for name, p in peft.items()
    }
    return {"root": root, "model": root / "out" / "model.onnx", "inputs": inputs, "base_out": base_out, "refs": refs}


SKIP = object()  # a row _check leaves alone


def _session(case, **kw) -> LoraSession:
    return LoraSession(case["model"], providers=["CPUExecutionProvider"], **kw)


def _check(case, got, rows) -> None:
    for i, row in enumerate(rows):
        if row is SKIP:
            continue
        if row is None:
            for g, b in zip(got, case["base_out"]):
                np.testing.assert_allclose(g[i], b[i], rtol=0, atol=1e-6)
            continue
        ref = case["refs"][row][i]
        assert rel(got[0][i], case["base_out"][0][i]) > 1e-3, (i, row)  # the adapter matters here
        for g, r in zip(got, ref):
            assert rel(g[i], r[0]) <= 1e-5, (i, row)


def test_rows_run_their_own_adapters(case, tmp_path):
    root = case["root"]
    sess = _session(case)
    sess.load_adapter("qv", root / "out" / "qv.onnx_adapter")  # files inject wrote
    sess.load_adapter("v8", root / "v8")  # a PEFT folder (rank 8 > the pool's: the pool grows)
    # convert makes later adapters for a per-row model: the same slot tensors as for single-adapter slots
    convert_adapter(root / "qo", case["model"], tmp_path / "qo.onnx_adapter")
    sess.load_adapter("qo", tmp_path / "qo.onnx_adapter")
    assert sess.adapters == ["qo", "qv", "v8"] and sess.per_row
    f = feeds(case["inputs"])
    rows = ["v8", None, "qo", "qv"]
    _check(case, sess.run(None, f, adapters=rows), rows)
    _check(case, sess.run(None, f, adapter="qo"), ["qo"] * 4)  # one adapter for all rows
    _check(case, sess.run(None, f), [None] * 4)
    _check(case, sess.run(None, f, adapters=[None] * 4), [None] * 4)
    # unload frees the entry; the next load takes it, at another rank
    sess.unload_adapter("qv")
    with pytest.raises(AdapterError, match="no adapter named 'qv' is loaded"):
        sess.run(None, f, adapters=["qv", None, None, None])
    sess.load_adapter("qv2", root / "qv")
    rows = ["qo", "qv2", "v8", None]
    got = sess.run(None, f, adapters=rows)
    _check(case, got, ["qo", "qv", "v8", None])


def test_bad_rows_are_the_projects_errors(case):
    sess = _session(case)
    sess.load_adapter("qv", case["root"] / "qv")
    f = feeds(case["inputs"])
    with pytest.raises(AdapterError, match="no adapter named 'nope' is loaded"):
        sess.run(None, f, adapters=["qv", "nope", None, None])
    with pytest.raises(AdapterError, match="3 rows, the batch has 4"):
        sess.run(None, f, adapters=["qv", None, None])
    with pytest.raises(AdapterError, match="not both"):
        sess.run(None, f, adapter="qv", adapters=["qv"] * 4)
    with pytest.raises(AdapterError):
        sess.run(None, f, adapters="qv")


def test_full_pool_refuses_or_evicts_the_least_recently_used(case):
    f = feeds(case["inputs"])
    sess = _session(case, pool_size=2)
    sess.load_adapter("qv", case["root"] / "qv")
    sess.load_adapter("qo", case["root"] / "qo")
    with pytest.raises(AdapterError, match="pool is full"):
        sess.load_adapter("v8", case["root"] / "v8")
    lru = _session(case, pool_size=2, evict="lru")
    lru.load_adapter("qv", case["root"] / "qv")
    lru.load_adapter("qo", case["root"] / "qo")
    lru.run(None, f, adapter="qv")  # qo is now the least recently used
    lru.load_adapter("v8", case["root"] / "v8")
    assert lru.adapters == ["qv", "v8"]
    rows = ["qv", "v8", None, "v8"]
    _check(case, lru.run(None, f, adapters=rows), rows)
    with pytest.raises(AdapterError, match="no adapter named 'qo'"):
        lru.run(None, f, adapter="qo")


def test_sixty_four_resident_adapters(case):
    """64 entries (tensors given as dicts, each scaled differently); each row still gets its own."""
    from lora_export.formats.adapter_files import read_adapter_tensors

    sess = _session(case)
    tensors = read_adapter_tensors(case["root"] / "out" / "qv.onnx_adapter")
    for i in range(64):
        scaled = {k: (v * np.float32(1 + i / 64) if k.endswith("lora_B") else v) for k, v in tensors.items()}
        sess.load_adapter(f"a{i}", scaled)
    with pytest.raises(AdapterError, match="pool is full"):
        sess.load_adapter("one-more", tensors)
    sess.unload_adapter("a0")
    sess.load_adapter("qv", tensors)
    f = feeds(case["inputs"])
    rows = ["qv", None, "a63", "qv"]
    got = sess.run(None, f, adapters=rows)
    _check(case, got, ["qv", None, SKIP, "qv"])
    one = sess.run(None, {k: v[2:3] for k, v in f.items()}, adapter="a63")
    np.testing.assert_allclose(got[0][2], one[0][0], rtol=1e-6, atol=1e-6)
    assert rel(got[0][2], case["refs"]["qv"][2][0][0]) > 1e-3  # a63 is not qv


def test_runs_see_a_consistent_pool_while_others_load_and_unload(case):
    """Two threads run mixed batches while a third loads and unloads other adapters: every result equals
    the single-threaded one."""
    sess = _session(case, pool_size=3)
    sess.load_adapter("qv", case["root"] / "qv")
    sess.load_adapter("v8", case["root"] / "v8")
    f = feeds(case["inputs"])
    rows = ["v8", "qv", None, "qv"]
    expected = sess.run(None, f, adapters=rows)
    from lora_export.formats.adapter_files import read_adapter_tensors

    qo = read_adapter_tensors(case["root"] / "out" / "qo.onnx_adapter")
    errors: list[BaseException] = []
    stop = threading.Event()

    def runner() -> None:
        try:
            for _ in range(15):
                got = sess.run(None, f, adapters=rows)
                for g, e in zip(got, expected):
                    np.testing.assert_array_equal(g, e)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def churn() -> None:
        try:
            while not stop.is_set():
                sess.load_adapter("qo", qo)
                sess.unload_adapter("qo")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=runner) for _ in range(2)]
    loader = threading.Thread(target=churn)
    loader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    loader.join()
    assert not errors, errors[0]


def test_inspect_shows_the_pool(case):
    code, out, err = cli_run("inspect", case["model"])
    assert code == 0, err
    assert "per-row adapters: input lora_adapter_ids" in out
    assert "2 adapter(s)" in out and "qv" in out and "qo" in out


@pytest.mark.cuda
def test_cuda_pool_is_resident_and_rows_match(case):
    from lora_export.runtime.session import cuda_works

    if not cuda_works():
        pytest.skip("ONNX Runtime's CUDA EP does not work here")
    sess = LoraSession(case["model"])
    assert sess.device_type == "cuda"
    sess.load_adapter("qv", case["root"] / "qv")
    sess.load_adapter("v8", case["root"] / "v8")
    with sess.pool.reading(["qv"]) as (_, values):
        assert {v.device_name().lower() for v in values.values()} == {"cuda"}
    rows = ["v8", None, "qv", "v8"]
    got = sess.run(None, feeds(case["inputs"]), adapters=rows)
    for i, row in enumerate(rows):  # TF32/fused kernels on GPU: a looser tolerance than on CPU
        ref = case["base_out"][0][i] if row is None else case["refs"][row][i][0][0]
        assert rel(got[0][i], ref) <= 1e-3


def test_single_adapter_model_takes_one_name_for_all_rows(case, tmp_path):
    """adapters= on a model injected without --per-row: one name for every row works, a mix is refused."""
    code, _, err = cli_run("inject", case["root"] / "base.onnx", f"qv={case['root'] / 'qv'}", "-o", tmp_path / "o")
    assert code == 0, err
    sess = LoraSession(tmp_path / "o" / "model.onnx", providers=["CPUExecutionProvider"])
    sess.load_adapter("qv", tmp_path / "o" / "qv.onnx_adapter")
    f = feeds(case["inputs"])
    _check(case, sess.run(None, f, adapters=["qv"] * 4), ["qv"] * 4)
    with pytest.raises(AdapterError, match="inject with --per-row"):
        sess.run(None, f, adapters=["qv", None, "qv", "qv"])

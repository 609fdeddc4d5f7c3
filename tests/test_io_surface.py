"""The I/O surface: where external data may be read from, what outputs may name, atomic output sets
(also under kill -9), stale temp cleanup, file modes under the umask, and FIFOs as inputs.

Everything runs on a one-MatMul model with external data and a tiny adapter (no torch export)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import stat
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from lora_export import Adapter, LoraConfig, LoraTarget, save_adapter_files
from lora_export.cli import cli
from lora_export.errors import AdapterError, LoraExportError, ModelError
from lora_export.files.staging import STAGE_PREFIX
from lora_export.graph.model.model_io import load_model
from lora_export.graph.verbs.convert import convert_adapter
from lora_export.graph.verbs.inject import inject_files
from lora_export.graph.verbs.merge import merge_file
from lora_export.runtime.verify import save_reference

IN, OUT, R = 32, 24, 2
REPO = Path(__file__).resolve().parent.parent


def _model(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    w = ir.Value(
        name="q.weight", const_value=ir.tensor(rng.standard_normal((IN, OUT)).astype(np.float32), name="q.weight")
    )
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, IN]))
    node = ir.node("MatMul", [x, w], name="/q/MatMul")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 17})
    return ir.Model(graph, ir_version=9)


def _base(folder: Path, seed: int = 0) -> Path:
    """``folder/model.onnx`` + ``model.onnx.data``, as another tool writes them (the data file's name fixed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    proto = ir.serde.serialize_model(_model(seed))
    onnx.save(proto, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def _adapter(folder: Path, name: str = "ad", seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    t = LoraTarget("q", "linear", A=rng.standard_normal((R, IN)).astype(np.float32),
                   B=rng.standard_normal((OUT, R)).astype(np.float32), scale=0.5)  # fmt: skip
    return save_adapter_files(Adapter({"q": t}, LoraConfig(r=R, lora_alpha=1.0), name=name), folder / name)


def _x() -> np.ndarray:
    return np.random.default_rng(9).standard_normal((2, IN)).astype(np.float32)


def _run(path: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": _x()})[0]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _cli(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_one_line_refusal(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def _stages(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(STAGE_PREFIX))


class _Blocked(BaseException):
    """Not an OSError (or any Exception): no error handler under test may turn it into a clean refusal."""


@pytest.fixture
def no_hang():
    """Fail instead of blocking forever if something opens a FIFO."""

    def boom(*_):
        raise _Blocked("blocked: a FIFO was opened")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# -- 1. external data: the locations the loader opens ------------------------------------------


def test_external_data_through_hf_cache_symlinks_reads_the_given_folder(tmp_path):
    """snapshots/<rev>/{model.onnx,model.onnx.data} → ../../blobs/<hash>: both links followed, paired right."""
    src = _base(tmp_path / "src")
    want_dir = tmp_path / "want"
    merge_file(src, _adapter(tmp_path), want_dir / "m.onnx")
    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    snap = hub / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    for name in ("model.onnx", "model.onnx.data"):
        blob = hub / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        blob.write_bytes((src.parent / name).read_bytes())
        (snap / name).symlink_to(Path("..", "..", "blobs", blob.name))
    out = tmp_path / "out" / "m.onnx"
    merge_file(snap / "model.onnx", tmp_path / "ad", out)
    np.testing.assert_array_equal(_run(out), _run(want_dir / "m.onnx"))
    assert _hashes(out.parent) == _hashes(want_dir)


def test_hard_linked_external_data_is_accepted(tmp_path):
    """A ``cp -al`` snapshot: every file has two links; onnx-ir 1.1 alone refuses that."""
    src = _base(tmp_path / "src")
    snap = tmp_path / "snap"
    subprocess.run(["cp", "-al", str(src.parent), str(snap)], check=True)
    assert (snap / "model.onnx.data").stat().st_nlink == 2
    model = load_model(snap / "model.onnx")
    np.testing.assert_array_equal(
        model.graph.initializers["q.weight"].const_value.numpy(),
        _model().graph.initializers["q.weight"].const_value.numpy(),
    )
    merge_file(snap / "model.onnx", _adapter(tmp_path), tmp_path / "out" / "m.onnx")
    inject_files(snap / "model.onnx", [tmp_path / "ad"], tmp_path / "inj")
    assert (tmp_path / "inj" / "model.onnx").is_file()


def _set_location(path: Path, location: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize(
    "location",
    ["<abs>", "../outside.bin", "sub/../../outside.bin", "..\\outside.bin", "C:\\x", "a\0b", ""],
    ids=repr,
)
def test_external_data_location_outside_or_invalid_is_one_line_error(tmp_path, location):
    path = _base(tmp_path / "m")
    (tmp_path / "outside.bin").write_bytes(bytes(4096))
    # an absolute path to a stand-in secret in the temp dir, never a real system file
    _set_location(path, str(tmp_path / "outside.bin") if location == "<abs>" else location)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)
    _assert_one_line_refusal(_cli("inspect", path), "outside the model's folder")


def _external_tensor_proto(name: str, location: str) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=[1])
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        t.external_data.add(key=key, value=value)
    return t


def _with_extra(path: Path, where: str, location: str) -> None:
    """Add an external tensor the loader may read: a Constant's value, an If branch's initializer,
    or a Constant inside a model-local function."""
    proto = onnx.load(str(path), load_external_data=False)
    h = onnx.helper
    const = h.make_node("Constant", [], ["c"], name="c", value=_external_tensor_proto("c", location))
    if where == "constant":
        proto.graph.node.append(const)
    elif where == "subgraph":
        branch = h.make_graph([], "b", [], [h.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [1])])
        branch.initializer.append(_external_tensor_proto("k", location))
        cond = h.make_node("Constant", [], ["cond"], value=h.make_tensor("t", onnx.TensorProto.BOOL, [], [True]))
        proto.graph.node.extend([cond, h.make_node("If", ["cond"], ["k_out"], then_branch=branch, else_branch=branch)])
    else:
        func = h.make_function("local", "F", [], ["c"], [const], [h.make_opsetid("", 17)])
        proto.functions.append(func)
        proto.opset_import.append(h.make_opsetid("local", 1))
        proto.graph.node.append(h.make_node("F", [], ["f_out"], domain="local"))
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("where", ["constant", "subgraph", "function"])
@pytest.mark.parametrize("location", ["<abs>", "../../x"])
def test_external_data_in_attributes_and_subgraphs_is_checked(tmp_path, where, location):
    path = _base(tmp_path / "m")
    if location == "<abs>":
        (tmp_path / "secret.bin").write_bytes(bytes(64))
        location = str(tmp_path / "secret.bin")
    _with_extra(path, where, location)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)
    _assert_one_line_refusal(_cli("merge", path, _adapter(tmp_path), "-o", tmp_path / "o.onnx"), "outside")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("external", [None, True, False], ids=["patched", "resaved", "inline"])
def test_saved_model_keeps_external_constant_values(tmp_path, external):
    """A Constant whose value lives in the base's data file is written inline, not as a stale reference."""
    path = _base(tmp_path / "b")
    proto = onnx.load(str(path), load_external_data=False)
    t = _external_tensor_proto("c", "model.onnx.data")
    t.external_data[1].value, t.external_data[2].value = "16", "4"  # the 5th float of q.weight
    proto.graph.node.append(onnx.helper.make_node("Constant", [], ["c"], name="c", value=t))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1]))
    path.write_bytes(proto.SerializeToString())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(["c"], {"x": _x()})[0]
    out = tmp_path / "out" / "m.onnx"
    merge_file(path, _adapter(tmp_path), out, external=external)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(["c"], {"x": _x()})[0], want)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_external_data_that_is_not_a_regular_file_is_refused(tmp_path, kind, no_hang):
    path = _base(tmp_path / "m")
    target = tmp_path / "m" / "weights.bin"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    _set_location(path, "weights.bin")
    with pytest.raises(ModelError, match="not a regular file"):
        load_model(path)


# -- 2. what an output may name -----------------------------------------------------------------


def test_merge_output_fifo_is_refused(tmp_path, no_hang):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    _assert_one_line_refusal(_cli("merge", base, adapter, "-o", fifo), "FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    os.mkfifo(tmp_path / "o2.onnx.data")
    _assert_one_line_refusal(_cli("merge", base, adapter, "-o", tmp_path / "o2.onnx"), "FIFO")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "b", "o2.onnx.data", "out.onnx"]


def test_merge_output_device_is_refused(tmp_path, monkeypatch):
    import lora_export.files.checks as fc

    fake = tmp_path / "dev-null"
    real_stat = os.stat

    def fake_stat(p, *a, **k):
        if os.fspath(p) == str(fake):
            return os.stat_result((stat.S_IFCHR | 0o666, 0, 0, 1, 0, 0, 0, 0, 0, 0))
        return real_stat(p, *a, **k)

    monkeypatch.setattr(fc.os, "stat", fake_stat)
    with pytest.raises(ModelError, match="character device"):
        merge_file(_base(tmp_path / "b"), _adapter(tmp_path), fake)


def test_merge_output_directory_is_refused(tmp_path):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_one_line_refusal(_cli("merge", base, adapter, "-o", f"{tmp_path / 'newdir'}/"), "names a folder")
    assert not (tmp_path / "newdir").exists()
    (tmp_path / "existing").mkdir()
    _assert_one_line_refusal(_cli("merge", base, adapter, "-o", tmp_path / "existing"), "directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == [*before, "existing"]
    assert list((tmp_path / "existing").iterdir()) == []


def test_merge_file_into_existing_dir_writes_nothing(tmp_path):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelError, match="directory"):
        merge_file(base, adapter, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "b", "d"]
    assert list((tmp_path / "d").iterdir()) == []


def test_export_refuses_to_overwrite_the_factory_source(tmp_path, monkeypatch):
    name = f"io_factory_{os.getpid()}"
    src = tmp_path / f"{name}.py"
    src.write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 3), torch.zeros(1, 4)\n")
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _assert_one_line_refusal(_cli("export", f"{name}:make", src.name), "overwrite the input")
    assert src.read_bytes() == before


@pytest.mark.parametrize("blocker", ["model.onnx", "model.onnx.data", "ad.onnx_adapter", "ad.safetensors"])
def test_inject_refuses_a_folder_named_like_an_output(tmp_path, blocker):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    out = tmp_path / "out"
    (out / blocker).mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AdapterError, match=f"{blocker}: a folder of that name is in the way"):
        inject_files(base, [adapter], out)
    assert sorted(p.name for p in out.iterdir()) == sorted([blocker, "keep.txt"])
    assert not _stages(tmp_path)
    result = _cli("inject", base, adapter, "-o", out)
    _assert_one_line_refusal(result, blocker)


def test_convert_output_fifo_or_folder_is_refused(tmp_path, no_hang):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    inject_files(base, [adapter], tmp_path / "inj")
    model = tmp_path / "inj" / "model.onnx"
    os.mkfifo(tmp_path / "c.onnx_adapter")
    _assert_one_line_refusal(_cli("convert", adapter, "--model", model, "-o", tmp_path / "c.onnx_adapter"), "FIFO")
    result = _cli("convert", adapter, "--model", model, "-o", f"{tmp_path / 'd.onnx_adapter'}/")
    _assert_one_line_refusal(result, "names a folder")
    assert not (tmp_path / "d.onnx_adapter").exists()


def test_inject_through_a_symlinked_output_folder_keeps_the_link(tmp_path):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "mine.txt").write_text("x")
    (tmp_path / "out").symlink_to("real")
    inject_files(base, [adapter], tmp_path / "out")
    assert (tmp_path / "out").is_symlink()
    assert {"model.onnx", "ad.onnx_adapter", "mine.txt"} <= {p.name for p in (tmp_path / "real").iterdir()}


# -- 3. atomic output sets, leftovers of killed runs --------------------------------------------


def test_inject_carries_over_files_it_does_not_write(tmp_path):
    base, a1 = _base(tmp_path / "b"), _adapter(tmp_path, "one", seed=1)
    out = tmp_path / "out"
    inject_files(base, [a1], out)
    convert_adapter(_adapter(tmp_path, "late", seed=3), out / "model.onnx", out / "late.onnx_adapter")
    (out / "cfg").mkdir()
    (out / "cfg" / "serve.json").write_text("{}")
    (out / "link").symlink_to("cfg/serve.json")
    late_inode = (out / "late.onnx_adapter").stat().st_ino
    dir_inode = out.stat().st_ino
    result = inject_files(base, [_adapter(tmp_path, "two", seed=2)], out)
    names = sorted(p.name for p in out.iterdir())
    # one.* were written by the first inject and not by this one: stale, removed (see .lora-export.json).
    data = [p.name for p in result.files if p.name.endswith(".data")]
    assert names == sorted(
        [".lora-export.json", "model.onnx", *data, "late.onnx_adapter", "cfg", "link"]
        + ["two.onnx_adapter", "two.safetensors"]
    )
    assert (out / "late.onnx_adapter").stat().st_ino == late_inode  # linked, not copied
    assert (out / "link").is_symlink() and (out / "cfg" / "serve.json").read_text() == "{}"
    assert out.stat().st_ino != dir_inode  # a new folder swapped in
    assert sorted(p.name for p in result.files) == ["model.onnx", *data, "two.onnx_adapter", "two.safetensors"]
    assert len(data) == 1
    assert not _stages(tmp_path)


def test_inject_swap_without_renameat2_still_replaces_the_whole_folder(tmp_path, monkeypatch):
    from lora_export.files import publish

    monkeypatch.setattr(publish, "_renameat2_exchange", lambda a, b: False)
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    out = tmp_path / "out"
    inject_files(_base(tmp_path / "b0", seed=5), [adapter], out)
    (out / "notes.txt").write_text("kept")
    inject_files(base, [adapter], out)
    inject_files(base, [adapter], tmp_path / "ref")
    assert _hashes(out) == {**_hashes(tmp_path / "ref"), "notes.txt": _hashes(out)["notes.txt"]}
    assert (out / "notes.txt").read_text() == "kept" and not _stages(tmp_path)


# The staging cleanup and the kill -9 matrix are in test_atomic_outputs.py.


# -- 4. modes follow the umask --------------------------------------------------------------------


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=oct)
def test_outputs_honour_the_umask(tmp_path, mask):
    base = _base(tmp_path / "b")
    with _umask(mask):
        adapter = _adapter(tmp_path / "work")
        merge_file(base, adapter, tmp_path / "work" / "merged" / "m.onnx")
        inject_files(base, [adapter], tmp_path / "work" / "inj")
        convert_adapter(adapter, tmp_path / "work" / "inj" / "model.onnx", tmp_path / "work" / "c.onnx_adapter")
        convert_adapter(adapter, tmp_path / "work" / "inj" / "model.onnx", tmp_path / "work" / "c.safetensors")
        save_reference(tmp_path / "work" / "ref", ["y"], [np.zeros(3, np.float32)], {"x": _x()})
        result = _cli("verify", tmp_path / "work" / "merged" / "m.onnx", "--save-outputs", tmp_path / "work" / "ref2")
        assert result.exit_code == 0, result.output
    modes = _modes(tmp_path / "work")
    assert any(re.fullmatch(r"inj/model\.onnx\.[0-9a-f]{16}\.data", name) for name in modes)
    assert "ref2/inputs.npz" in modes and "ad/adapter_config.json" in modes
    for name, mode in modes.items():
        want = 0o777 & ~mask if (tmp_path / "work" / name).is_dir() else 0o666 & ~mask
        assert mode == want, f"{name}: {oct(mode)} != {oct(want)}"


# -- 5. FIFOs as inputs ---------------------------------------------------------------------------


def _fifo_cases(tmp_path: Path):
    base, adapter = _base(tmp_path / "b"), _adapter(tmp_path)
    inject_files(base, [adapter], tmp_path / "inj")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo_adapter = tmp_path / "fifo_ad"
    fifo_adapter.mkdir()
    (fifo_adapter / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    os.mkfifo(fifo_adapter / "adapter_model.safetensors")
    fifo_cfg = tmp_path / "fifo_cfg"
    fifo_cfg.mkdir()
    os.mkfifo(fifo_cfg / "adapter_config.json")
    link = tmp_path / "link.onnx"
    link.symlink_to(fifo)
    o = tmp_path / "o.onnx"
    return {
        "merge-base-weights": ["merge", base, adapter, "-o", o, "--base-weights", fifo],
        "merge-model": ["merge", fifo, adapter, "-o", o],
        "merge-model-symlink": ["merge", link, adapter, "-o", o],
        "merge-adapter-weights": ["merge", base, fifo_adapter, "-o", o],
        "merge-adapter-config": ["merge", base, fifo_cfg, "-o", o],
        "merge-adapter-file": ["merge", base, fifo, "-o", o],
        "inject-base-weights": ["inject", base, adapter, "-o", tmp_path / "i2", "--base-weights", fifo],
        "convert-model": ["convert", adapter, "--model", fifo, "-o", tmp_path / "c.onnx_adapter"],
        "inspect-model": ["inspect", fifo],
        "verify-model": ["verify", fifo, base],
        "verify-inputs": ["verify", base, base, "--inputs", fifo],
        "verify-reference": ["verify", base, "--reference", fifo],
    }


FIFO_CASES = [
    "merge-base-weights", "merge-model", "merge-model-symlink", "merge-adapter-weights", "merge-adapter-config",
    "merge-adapter-file", "inject-base-weights", "convert-model", "inspect-model", "verify-model", "verify-inputs",
    "verify-reference",
]  # fmt: skip


@pytest.mark.parametrize("case", FIFO_CASES)
def test_fifo_inputs_are_refused_without_blocking(tmp_path, case, no_hang):
    args = _fifo_cases(tmp_path)[case]
    _assert_one_line_refusal(_cli(*args), "FIFO")
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "i2").exists()


def test_session_refuses_a_fifo_model(tmp_path, no_hang):
    from lora_export.runtime.session import LoraSession

    os.mkfifo(tmp_path / "m.onnx")
    with pytest.raises(LoraExportError, match="FIFO"):
        LoraSession(tmp_path / "m.onnx")

"""External data resolves the way ONNX Runtime resolves it, in every reader (files.beside_model).

After links are followed, a tensor's data file must lie under the model's folder as given or under the
folder of the model file's real path. Each layout below is built in a temp folder with a stand-in
"secret" file outside the model's folders (random bytes of the data file's size, so a reader that
follows the link would succeed and copy it). Plain ONNX Runtime is the reference for what is accepted;
each command (merge, inject, inspect, convert, verify) and ``LoraSession`` must agree with it, refuse in
one line (exit 2) with nothing written, and never let the secret's bytes reach any output.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from lora_export import Adapter, LoraConfig, LoraSession, LoraTarget, save_adapter_files
from lora_export.cli import cli
from lora_export.errors import LoraExportError, ModelError
from lora_export.files.beside_model import outside_reason
from lora_export.graph.model.model_io import load_model
from lora_export.graph.verbs.inject import inject_files

IN, OUT, R = 32, 24, 2
DATA = "model.onnx.data"


def _base_proto(seed: int = 0) -> onnx.ModelProto:
    h = onnx.helper
    w = np.random.default_rng(seed).standard_normal((IN, OUT)).astype(np.float32)
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, IN])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, OUT])
    node = h.make_node("MatMul", ["x", "q.weight"], ["y"], name="/q/MatMul")
    graph = h.make_graph([node], "g", [x], [y], initializer=[onnx.numpy_helper.from_array(w, "q.weight")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9)


def _plain(folder: Path) -> Path:
    """``folder/model.onnx`` with all its initializers in ``folder/model.onnx.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(_base_proto(), path, save_as_external_data=True, location=DATA, size_threshold=0)
    return path


def _adapter(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    t = LoraTarget("q", "linear", A=rng.standard_normal((R, IN)).astype(np.float32),
                   B=rng.standard_normal((OUT, R)).astype(np.float32), scale=0.5)  # fmt: skip
    return save_adapter_files(Adapter({"q": t}, LoraConfig(r=R, lora_alpha=1.0), name="ad"), folder / "ad")


def _relocated(src: Path, location: str) -> bytes:
    """``src``'s model, its external tensors read from ``location``."""
    proto = onnx.load(str(src), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    return proto.SerializeToString()


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


# Each layout: (root, source model) -> the model path to give. ``root/secret`` (or the file named in a
# refused layout) holds the stand-in secret. Accepted layouts hold the source's real data.
def _lay_plain(r, src, data):
    _put(r / "m" / DATA, data)
    return _put(r / "m" / "model.onnx", _relocated(src, DATA))


def _lay_subdir(r, src, data):  # ORT's test: data in a sub-folder of the real model folder
    _put(r / "m" / "sub" / "w.bin", data)
    return _put(r / "m" / "model.onnx", _relocated(src, "sub/w.bin"))


def _lay_dotdot_inside(r, src, data):
    _put(r / "m" / "w.bin", data)
    (r / "m" / "sub").mkdir()
    return _put(r / "m" / "model.onnx", _relocated(src, "sub/../w.bin"))


def _lay_hf(r, src, data, data_blob="blobs/g2"):  # ORT's test: the Hugging Face cache
    _put(r / "blobs" / "g1", _relocated(src, "w.bin"))
    _put(r / data_blob, data)
    _link(r / "snapshots" / "v" / "model.onnx", "../../blobs/g1")
    _link(r / "snapshots" / "v" / "w.bin", f"../../{data_blob}")
    return r / "snapshots" / "v" / "model.onnx"


def _lay_hf_subdir(r, src, data):
    return _lay_hf(r, src, data, "blobs/data/g2")


def _lay_hard(r, src, data):
    _put(r / "elsewhere" / "g2", data)
    (r / "m").mkdir()
    os.link(r / "elsewhere" / "g2", r / "m" / "w.bin")
    return _put(r / "m" / "model.onnx", _relocated(src, "w.bin"))


def _lay_folder_link(r, src, data):
    _put(r / "real" / "w.bin", data)
    _put(r / "real" / "model.onnx", _relocated(src, "w.bin"))
    _link(r / "alias", "real")
    return r / "alias" / "model.onnx"


def _lay_elsewhere(r, src, data):  # ORT's test: data neither beside the link nor beside the real model
    _put(r / "model" / "g1", _relocated(src, "w.bin"))
    _link(r / "snapshots" / "v" / "model.onnx", "../../model/g1")
    _link(r / "snapshots" / "v" / "w.bin", "../../secret")
    return r / "snapshots" / "v" / "model.onnx"


def _lay_link_out(r, src, data):
    _link(r / "m" / "w.bin", str(r / "secret"))
    return _put(r / "m" / "model.onnx", _relocated(src, "w.bin"))


def _lay_model_link_data_out(r, src, data):  # the model is a link; its folder holds a data link out
    _put(r / "real" / "w.bin", data)
    _put(r / "real" / "model.onnx", _relocated(src, "w.bin"))
    _link(r / "a" / "model.onnx", "../real/model.onnx")
    _link(r / "a" / "w.bin", "../secret")
    return r / "a" / "model.onnx"


def _lay_dotdot_out(r, src, data):
    return _put(r / "m" / "model.onnx", _relocated(src, "../secret"))


def _lay_absolute(r, src, data):
    return _put(r / "m" / "model.onnx", _relocated(src, str(r / "secret")))


def _lay_subdir_link_out(r, src, data):
    _link(r / "m" / "sub", str(r / "out_dir"))
    os.link(r / "secret", _put(r / "out_dir" / "x", b"").parent / "w.bin")
    return _put(r / "m" / "model.onnx", _relocated(src, "sub/w.bin"))


def _lay_sibling_prefix(r, src, data):  # m2 starts with "m": containment is by path component
    os.link(r / "secret", _put(r / "m2" / "x", b"").parent / "w.bin")
    _link(r / "m" / "w.bin", "../m2/w.bin")
    return _put(r / "m" / "model.onnx", _relocated(src, "w.bin"))


def _lay_dotdot_through_link(r, src, data):  # lnk/.. is the link target's parent, as the kernel reads it
    os.link(r / "secret", _put(r / "other" / "x" / "y", b"").parent.parent / "w.bin")
    _put(r / "m" / "w.bin", data)
    _link(r / "m" / "lnk", str(r / "other" / "x"))
    return _put(r / "m" / "model.onnx", _relocated(src, "lnk/../w.bin"))


ACCEPTED = {"plain": _lay_plain, "subdir": _lay_subdir, "dotdot_inside": _lay_dotdot_inside, "hf_cache": _lay_hf,
            "hf_cache_subdir": _lay_hf_subdir, "hard_link": _lay_hard, "folder_link": _lay_folder_link}  # fmt: skip
REFUSED = {"elsewhere": _lay_elsewhere, "link_out": _lay_link_out, "model_link_data_out": _lay_model_link_data_out,
           "dotdot_out": _lay_dotdot_out, "absolute": _lay_absolute, "subdir_link_out": _lay_subdir_link_out,
           "sibling_prefix": _lay_sibling_prefix, "dotdot_through_link": _lay_dotdot_through_link}  # fmt: skip


def _arrange(root: Path, src: Path, layout: str) -> tuple[Path, bytes]:
    """Lay ``src`` (model.onnx + model.onnx.data) out as ``layout`` under ``root``; (model path, secret)."""
    data = (src.parent / DATA).read_bytes()
    secret = np.random.default_rng(99).bytes(len(data))
    _put(root / "secret", secret)
    return {**ACCEPTED, **REFUSED}[layout](root, src, data), secret


def _ort_accepts(path: Path) -> bool:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        assert "External data path validation failed" in str(e), e
        return False
    return True


def _locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


@pytest.mark.parametrize("layout", [*ACCEPTED, *REFUSED])
def test_the_rule_agrees_with_onnx_runtime(tmp_path, layout):
    model, _ = _arrange(tmp_path / "L", _plain(tmp_path / "src"), layout)
    ours = all(outside_reason(model, loc) is None for loc in _locations(model))
    assert ours == _ort_accepts(model) == (layout in ACCEPTED)


def test_a_relative_model_path_is_judged_from_the_working_directory(tmp_path, monkeypatch):
    model, _ = _arrange(tmp_path / "L", _plain(tmp_path / "src"), "link_out")
    monkeypatch.chdir(model.parent)
    assert not _ort_accepts(Path("model.onnx"))
    assert "resolves to" in outside_reason("model.onnx", "w.bin")
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model("model.onnx")
    assert outside_reason("model.onnx", "model.onnx") is None


@pytest.mark.parametrize(
    "location, why",
    [("", "empty"), ("a\0b", "NUL"), ("/x", "absolute"), ("C:\\x", "absolute"), ("..\\x", "leaves"),
     ("a\\..\\..\\x", "leaves"), ("../x", "resolves to"), ("a/../../x", "resolves to")],
)  # fmt: skip
def test_locations_that_escape_by_their_text(tmp_path, location, why):
    assert why in outside_reason(tmp_path / "m" / "model.onnx", location)


def test_links_are_checked_again_right_before_each_read(tmp_path):
    """A data file swapped for a link out after loading is not read (the check runs in onnx-ir's hook)."""
    model, secret = _arrange(tmp_path / "L", _plain(tmp_path / "src"), "plain")
    loaded = load_model(model)
    (model.parent / DATA).unlink()
    (model.parent / DATA).symlink_to(tmp_path / "L" / "secret")
    with pytest.raises(ModelError, match="outside the model's folder"):
        loaded.graph.initializers["q.weight"].const_value.numpy()


# -- every command, and LoraSession -------------------------------------------------------------


def _fixed_data_name(model: Path) -> None:
    """Our outputs name their data by content (``model.onnx.<hash>.data``); the layouts move ``DATA``."""
    (old,) = _locations(model)
    proto = onnx.load(str(model), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = DATA
    os.replace(model.parent / old, model.parent / DATA)
    onnx.save(proto, model)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("beside")
    base = _plain(root / "base")
    adapter = _adapter(root)
    inject_files(base, [adapter], root / "injected")
    _fixed_data_name(root / "injected" / "model.onnx")
    res = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o", str(root / "want" / "m.onnx")])
    assert res.exit_code == 0, res.output
    return root, base, adapter


def _x() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((2, IN)).astype(np.float32)


def _run(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": _x()})[0]


def _command(name: str, model: Path, setup, out: Path) -> list[str]:
    root, base, adapter = setup
    return {
        "merge": ["merge", model, adapter, "-o", out / "m.onnx"],
        "inject": ["inject", model, adapter, "-o", out],
        "inspect": ["inspect", model, adapter],
        "convert": ["convert", adapter, "--model", model, "-o", out / "a.onnx_adapter"],
        "verify": ["verify", model, base, "--save-outputs", out],
    }[name]


def _source(name: str, setup) -> Path:
    """The model a command reads: the base, or (convert) the injected model."""
    root, base, _ = setup
    return root / "injected" / "model.onnx" if name == "convert" else base


COMMANDS = ["merge", "inject", "inspect", "convert", "verify"]


@pytest.mark.parametrize("layout", list(REFUSED))
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_data_outside_the_model_folders(tmp_path, setup, command, layout):
    model, secret = _arrange(tmp_path / "L", _source(command, setup), layout)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, [str(a) for a in _command(command, model, setup, out)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "outside the model's folder" in lines[0], res.output
    assert not out.exists()
    assert secret.hex()[:32] not in res.output
    secret_file = os.path.realpath(tmp_path / "L" / "secret")
    for folder, _, files in os.walk(tmp_path):
        for f in files:
            p = os.path.join(folder, f)
            if not os.path.islink(p) and not os.path.samefile(p, secret_file):
                assert secret not in Path(p).read_bytes(), p


@pytest.mark.parametrize("layout", list(ACCEPTED))
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reads_what_onnx_runtime_reads(tmp_path, setup, command, layout):
    root = setup[0]
    model, _ = _arrange(tmp_path / "L", _source(command, setup), layout)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, [str(a) for a in _command(command, model, setup, out)])
    assert res.exit_code == 0, res.output
    if command == "merge":
        np.testing.assert_array_equal(_run(out / "m.onnx"), _run(root / "want" / "m.onnx"))
    elif command == "inject":
        np.testing.assert_array_equal(_run(out / "model.onnx"), _run(root / "injected" / "model.onnx"))
        assert (out / "ad.onnx_adapter").read_bytes() == (root / "injected" / "ad.onnx_adapter").read_bytes()
    elif command == "convert":
        assert (out / "a.onnx_adapter").read_bytes() == (root / "injected" / "ad.onnx_adapter").read_bytes()
    elif command == "verify":
        assert sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("layout", ["hf_cache", "link_out", "model_link_data_out", "elsewhere"])
def test_lora_session_agrees_with_onnx_runtime(tmp_path, setup, layout):
    root = setup[0]
    model, _ = _arrange(tmp_path / "L", root / "injected" / "model.onnx", layout)
    if layout in REFUSED:
        for twin in (False, True):
            with pytest.raises(LoraExportError, match="outside the model's folder") as info:
                LoraSession(model, providers=["CPUExecutionProvider"], base_session=twin)
            assert "\n" not in str(info.value)
        return
    assert _ort_accepts(model)
    sess = LoraSession(model, providers=["CPUExecutionProvider"], base_session=True)
    sess.load_adapter("ad", root / "injected" / "ad.onnx_adapter")
    want = ort.InferenceSession(str(root / "want" / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": _x()}, adapter="ad")[0], want.run(None, {"x": _x()})[0],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    np.testing.assert_array_equal(sess.run(None, {"x": _x()})[0], _run(setup[1]))


def test_a_secret_is_never_copied_by_inject_into_an_existing_output(tmp_path, setup):
    """The leak the rule closes: inject copies the base's weights, so a followed link would publish them."""
    root, base, adapter = setup
    out = tmp_path / "out"
    shutil.copytree(root / "injected", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    model, secret = _arrange(tmp_path / "L", base, "link_out")
    res = CliRunner().invoke(cli, ["inject", str(model), str(adapter), "-o", str(out)])
    assert res.exit_code == 2 and "outside the model's folder" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_merge_checks_the_data_file_again_before_copying_it_whole(tmp_path, setup, monkeypatch):
    """merge copies the base's data file outside onnx-ir (patch_save): a link swapped in before that copy."""
    import lora_export.graph.verbs.merge as merge_module

    model, secret = _arrange(tmp_path / "L", setup[1], "plain")
    real_save = merge_module.save_patched

    def swap_then_save(*args, **kwargs):
        (model.parent / DATA).unlink()
        (model.parent / DATA).symlink_to(tmp_path / "L" / "secret")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(merge_module, "save_patched", swap_then_save)
    res = CliRunner().invoke(cli, ["merge", str(model), str(setup[2]), "-o", str(tmp_path / "out" / "m.onnx")])
    assert res.exit_code == 2 and "outside the model's folder" in res.output, res.output
    assert not (tmp_path / "out" / "m.onnx").exists() and not (tmp_path / "out" / "m.onnx.data").exists()


def test_a_model_path_through_a_link_and_dotdot_is_judged_as_the_kernel_reads_it(tmp_path):
    """``alias/../m/model.onnx`` with alias -> real/sub names real/m/model.onnx, not L/m/model.onnx."""
    src = _plain(tmp_path / "src")
    good, _ = _arrange(tmp_path / "L" / "real", src, "plain")  # L/real/m/model.onnx, data beside it
    bad, _ = _arrange(tmp_path / "L", src, "link_out")  # L/m/model.onnx, data linked to L/secret
    (tmp_path / "L" / "real" / "sub").mkdir()
    (tmp_path / "L" / "alias").symlink_to(tmp_path / "L" / "real" / "sub")
    given = tmp_path / "L" / "alias" / ".." / "m" / "model.onnx"
    assert os.path.samefile(given, good) and not os.path.samefile(given, bad)
    assert _ort_accepts(given)
    np.testing.assert_array_equal(load_model(given).graph.initializers["q.weight"].const_value.numpy(),
                                  onnx.numpy_helper.to_array(onnx.load(str(src)).graph.initializer[0]))  # fmt: skip

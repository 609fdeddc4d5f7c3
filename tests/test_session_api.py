"""The public API's details: LoraSession behaves like an ONNX Runtime InferenceSession, dtype errors have their
own class, the package is typed (py.typed, the lazily imported torch API visible to type checkers), and
save_adapter records the base model for PEFT."""

from __future__ import annotations

import ast
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from inject_fixtures import llama_case_fixture, rel_err  # noqa: F401

import lora_export
from lora_export import (
    ConfigError,
    DtypeError,
    LoraExportError,
    LoraSession,
    ShapeError,
)
from lora_export.errors import one_line
from lora_export.formats.adapter_files import read_adapter_tensors, write_adapter_tensors

ROOT = Path(__file__).resolve().parents[1]
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def served(llama_case):
    sess = LoraSession(llama_case.model, providers=CPU)
    sess.load_adapter("a", llama_case.out_dir / "a_r4.onnx_adapter")
    return sess


def _plain(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=CPU)


def _args(args) -> list[tuple]:
    return [(a.name, a.shape, a.type) for a in args]


def _refused(cls, fn, *words) -> str:
    with pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_introspection_matches_inference_session(served, llama_case):
    plain = _plain(llama_case.model)
    base = _plain(llama_case.base_onnx)
    # The user inputs and outputs: as ORT lists them, for the injected model and for the base it came from.
    assert _args(served.get_inputs()) == _args(plain.get_inputs()) == _args(base.get_inputs())
    assert _args(served.get_outputs()) == _args(plain.get_outputs()) == _args(base.get_outputs())
    assert [a.name for a in served.get_inputs()] == ["input_ids", "attention_mask"]
    assert all(hasattr(a, "name") and hasattr(a, "shape") and hasattr(a, "type") for a in served.get_inputs())
    # The slot inputs are listed apart: every input of every slot, none of them a user input.
    slot_names = [a.name for a in served.get_slot_inputs()]
    assert slot_names == sorted(n for slot in served.slots.values() for n in slot.inputs)
    assert set(slot_names) <= {a.name for a in plain.get_overridable_initializers()}
    assert set(slot_names).isdisjoint(a.name for a in served.get_inputs())
    q = "model.layers.0.self_attn.q_proj"
    assert {a.name: a.shape for a in served.get_slot_inputs()}[f"{q}.lora_A"] == [32, f"{q}.rank"]
    assert served.get_providers() == plain.get_providers() == CPU
    assert served.get_provider_options().keys() == plain.get_provider_options().keys()
    meta = served.get_modelmeta()
    assert meta.graph_name == plain.get_modelmeta().graph_name
    assert "lora_export.slots" in meta.custom_metadata_map


def test_run_output_names_like_ort(served, llama_case):
    plain = _plain(llama_case.model)  # rank-0 defaults: the base model
    want = plain.run(None, llama_case.feeds)
    assert len(want) == 1
    for names in (None, [], ["output"], ("output",)):
        got = served.run(names, llama_case.feeds)
        assert len(got) == 1 and got[0].shape == want[0].shape and rel_err(got[0], want[0]) <= 1e-6, names
    # A repeated name: ORT gives it twice, so do we (two arrays, not one buffer).
    twice = served.run(["output", "output"], llama_case.feeds, adapter="a")
    assert len(twice) == len(plain.run(["output", "output"], llama_case.feeds)) == 2
    assert twice[0] is not twice[1] and np.array_equal(twice[0], twice[1])
    assert rel_err(twice[0], llama_case.refs["a_r4"]) <= 1e-5
    # Array-likes and OrtValues as feeds, as ORT's run takes them.
    feeds = {k: v.tolist() for k, v in llama_case.feeds.items()}
    feeds["attention_mask"] = ort.OrtValue.ortvalue_from_numpy(llama_case.feeds["attention_mask"])
    assert rel_err(served.run(None, feeds)[0], want[0]) <= 1e-6


def test_run_options_reach_the_run(served, llama_case):
    options = ort.RunOptions()
    options.logid = "api-test"
    assert rel_err(served.run(None, llama_case.feeds, "a", options)[0], llama_case.refs["a_r4"]) <= 1e-5
    options.terminate = True
    plain = _plain(llama_case.model)
    with pytest.raises(Exception) as ort_error:
        plain.run(None, llama_case.feeds, options)
    assert "terminate flag" in str(ort_error.value)
    _refused(LoraExportError, lambda: served.run(None, llama_case.feeds, run_options=options), "terminate flag")


def test_bad_output_names_and_feeds_are_one_line(served, llama_case):
    feeds = llama_case.feeds
    _refused(LoraExportError, lambda: served.run(["output", "logits"], feeds), "'logits'", "outputs: output")
    _refused(LoraExportError, lambda: served.run("output", feeds), "list of output names", "outputs: output")
    _refused(LoraExportError, lambda: served.run([0], feeds), "unknown output name 0")
    _refused(LoraExportError, lambda: served.run(None, {"input_ids": feeds["input_ids"]}), "missing", "attention_mask")
    _refused(LoraExportError, lambda: served.run(None, dict(feeds, extra=feeds["input_ids"])), "'extra'", "input_ids")
    slot = served.get_slot_inputs()[0].name
    _refused(LoraExportError, lambda: served.run(None, dict(feeds, **{slot: np.zeros((32, 0))})), slot, "load_adapter")
    _refused(LoraExportError, lambda: served.run(None, list(feeds.values())), "dict")
    ids = feeds["input_ids"]
    short = dict(feeds, input_ids=ids[:, :5])
    _refused(ShapeError, lambda: served.run(None, short), "input_ids", f"({len(ids)}, 5)", "7)")
    _refused(ShapeError, lambda: served.run(None, dict(feeds, input_ids=ids[0])), "input_ids", "'batch', 7")
    _refused(LoraExportError, lambda: served.run(None, feeds, adapter="nope"), "'nope'", "loaded: 'a'")
    assert rel_err(served.run(None, feeds, adapter="a")[0], llama_case.refs["a_r4"]) <= 1e-5


def test_wrong_feed_dtype_is_a_dtype_error(served, llama_case):
    feeds = llama_case.feeds
    assert feeds["input_ids"].dtype == np.int64
    msg = _refused(
        DtypeError, lambda: served.run(None, dict(feeds, input_ids=feeds["input_ids"].astype(np.int32))), "'input_ids'"
    )
    assert msg == "input 'input_ids' has dtype int32, the model expects int64 (tensor(int64)); nothing is cast"
    floats = ort.OrtValue.ortvalue_from_numpy(feeds["attention_mask"].astype(np.float32))
    _refused(DtypeError, lambda: served.run(None, dict(feeds, attention_mask=floats)), "tensor(float)", "tensor(int64)")
    assert issubclass(DtypeError, ShapeError) and issubclass(DtypeError, LoraExportError)
    assert lora_export.DtypeError is DtypeError and "DtypeError" in lora_export.__all__


def test_adapter_with_wrong_dtype_is_a_dtype_error(served, llama_case, tmp_path):
    tensors = read_adapter_tensors(llama_case.out_dir / "a_r4.safetensors")
    key = "model.layers.0.self_attn.q_proj.lora_A"
    _refused(DtypeError, lambda: served.load_adapter("x", {k: v.astype(np.float64) for k, v in tensors.items()}), key)
    half = write_adapter_tensors(tmp_path / "half.safetensors", {k: v.astype(np.float16) for k, v in tensors.items()})
    _refused(DtypeError, lambda: served.load_adapter("x", half), "float16", "float32", "half.safetensors")
    one = dict(tensors, **{key: tensors[key].astype(np.float16)})
    _refused(DtypeError, lambda: served.load_adapter("x", one), key, "float16")
    # A shape misfit alone stays a plain ShapeError.
    with pytest.raises(ShapeError) as info:
        served.load_adapter("x", dict(tensors, **{key: np.zeros((31, 4), np.float32)}))
    assert not isinstance(info.value, DtypeError)
    assert served.adapters == ["a"]


def test_errors_keep_their_full_text():
    e = RuntimeError(
        "\x1b[1;31mError in execution: Got invalid dimensions for input: x\n index: 1 Got: 5\n Fix it.\x1b[m"
    )
    assert one_line(e) == "Error in execution: Got invalid dimensions for input: x index: 1 Got: 5 Fix it."
    assert one_line(ValueError("")) == "ValueError"
    long = RuntimeError("x" * 500 + "\n" + "tail")
    assert one_line(long).endswith(" tail") and len(one_line(long)) == 505


def test_adapter_file_error_is_complete(served, tmp_path):
    corrupt = tmp_path / "corrupt.onnx_adapter"
    corrupt.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(Exception) as ort_error:
        ort.AdapterFormat.read_adapter(str(corrupt))
    # ORT's message puts its reason after a long source location: it must survive, on one line.
    _refused(LoraExportError, lambda: served.load_adapter("x", corrupt), one_line(ort_error.value))


def test_session_creation_error_is_complete(tmp_path, monkeypatch):
    from lora_export.runtime import session as session_module

    class Boom:
        def __init__(self, *a, **k):
            raise RuntimeError("first line\nsecond line: the cause")

    model = tmp_path / "m.onnx"
    h = onnx.helper
    x, y = (h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy")
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9), model)
    monkeypatch.setattr(session_module.ort, "InferenceSession", Boom)
    _refused(LoraExportError, lambda: LoraSession(model, providers=CPU), "first line second line: the cause")


def test_repr(served, llama_case):
    text = repr(served)
    assert text.startswith("<LoraSession ") and "\n" not in text
    for part in (str(llama_case.model), "CPUExecutionProvider", "slots=6", "adapters=['a']"):
        assert part in text, text
    assert len(served.slots) == 6


# -- typing ----------------------------------------------------------------------------------------


def test_py_typed_is_in_the_package_and_the_wheel(tmp_path):
    assert (ROOT / "lora_export" / "py.typed").is_file()
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lora_export", src / "lora_export", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "w"),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip()[-300:]}")
    import zipfile

    (wheel,) = (tmp_path / "w").glob("*.whl")
    assert "lora_export/py.typed" in zipfile.ZipFile(wheel).namelist()


def _init_names() -> tuple[set[str], set[str], list[str], dict[str, str]]:
    """Names bound by __init__.py's plain imports, by its TYPE_CHECKING imports, __all__, and the lazily
    imported API (_LAZY_API and _TORCH_API)."""
    tree = ast.parse((ROOT / "lora_export" / "__init__.py").read_text())
    plain: set[str] = set()
    typing_only: set[str] = set()
    all_names: list[str] = []
    lazy: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            plain.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for sub in node.body:
                assert isinstance(sub, ast.ImportFrom) and sub.level == 1, ast.dump(sub)
                for a in sub.names:
                    typing_only.add(a.asname or a.name)
                    # Each import names a real attribute of that module (torch is here for the tests).
                    assert hasattr(importlib.import_module(f"lora_export.{sub.module}"), a.name), a.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "__all__":
                all_names = ast.literal_eval(node.value)
            elif node.targets[0].id in ("_TORCH_API", "_LAZY_API"):
                lazy.update(ast.literal_eval(node.value))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id in ("_TORCH_API", "_LAZY_API"):
                lazy.update(ast.literal_eval(node.value))
    return plain, typing_only, all_names, lazy


def test_every_exported_name_is_visible_to_type_checkers():
    plain, typing_only, all_names, lazy = _init_names()
    assert all_names and lazy
    assert len(all_names) == len(set(all_names))
    # Every name in __all__ is imported at type-check time: plainly, or in the TYPE_CHECKING block.
    assert set(all_names) <= plain | typing_only, sorted(set(all_names) - plain - typing_only)
    # The TYPE_CHECKING block is exactly the lazily imported API, from the modules __getattr__ imports.
    assert typing_only == set(lazy)
    for name, module in lazy.items():
        assert getattr(lora_export, name) is getattr(importlib.import_module(f"lora_export.{module}"), name)
        assert name in dir(lora_export)


def test_import_stays_torch_free():
    code = (
        "import sys, lora_export; assert 'torch' not in sys.modules, 'torch imported'; print(lora_export.LoraSession)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


@pytest.mark.slow
def test_mypy_sees_the_lazy_api(tmp_path):
    """With mypy installed: the lazily imported names have their real signatures (about a minute: torch)."""
    pytest.importorskip("mypy")
    script = tmp_path / "use.py"
    script.write_text(
        "import lora_export\n"
        "from lora_export import save_adapter\n"
        "reveal_type(lora_export.attach_lora)\n"
        "save_adapter(lora_export.attach_lora, 'x')  # wrong first argument\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-incremental", str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "MYPYPATH": str(ROOT)},
    )
    assert "config_or_adapter: lora_export.core.config.LoraConfig" in done.stdout, done.stdout
    assert 'Argument 1 to "save_adapter" has incompatible type' in done.stdout, done.stdout


# -- save_adapter records the base model ----------------------------------------------------------


def test_base_model_name_or_path_round_trip(tmp_path):
    from models import randomize_lora, tiny_llama
    from peft import PeftConfig

    from lora_export import LoraConfig, attach_lora, load_adapter, save_adapter

    base, _ = tiny_llama()
    model = attach_lora(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), verbose=False)
    randomize_lora(model, seed=3)

    def recorded(directory: Path) -> str | None:
        from_json = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert PeftConfig.from_pretrained(str(directory)).base_model_name_or_path == from_json
        return from_json

    save_adapter(model, tmp_path / "hub", base_model_name_or_path="org/tiny-llama")
    assert recorded(tmp_path / "hub") == "org/tiny-llama"
    assert load_adapter(tmp_path / "hub").name == "hub"  # our own loader reads it back too
    local = tmp_path / "models" / "base"
    save_adapter(model, tmp_path / "path", base_model_name_or_path=local)  # a Path is written as a string
    assert recorded(tmp_path / "path") == str(local)
    # By default: the model's own name_or_path, as PEFT's get_peft_model records it; else null.
    assert model.__dict__.get("name_or_path") == ""
    save_adapter(model, tmp_path / "none")
    assert recorded(tmp_path / "none") is None
    model.name_or_path = "org/from-the-model"
    save_adapter(model, tmp_path / "own")
    assert recorded(tmp_path / "own") == "org/from-the-model"
    with pytest.raises(ConfigError, match="base_model_name_or_path must be a string"):
        save_adapter(model, tmp_path / "bad", base_model_name_or_path=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("file", ["adapter_config.json", "adapter_model.safetensors"])
def test_load_adapter_from_a_peft_file(llama_case, file):
    """A PEFT adapter's config or weights file stands for its folder, as on the command line."""
    sess = LoraSession(llama_case.model, providers=CPU)
    sess.load_adapter("a", llama_case.adapters["a_r4"] / file)
    out = sess.run(None, llama_case.feeds, adapter="a")[0]
    assert rel_err(out, llama_case.refs["a_r4"]) <= 1e-5

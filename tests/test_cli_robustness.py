"""Hostile inputs through the CLI (and the API below it): every refusal is exit 2 with one line on
stderr and no traceback; nothing is written; inputs stay byte-identical; no temporary files are left."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from models import tiny_llama
from onnx_fixtures import export_onnx, file_hashes

from lora_export import Adapter, LoraConfig, LoraTarget, merge_file, save_adapter_files
from lora_export.cli import cli
from lora_export.errors import ModelError

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaMA (inline weights) and a small adapter on one of its q_proj layers."""
    root = tmp_path_factory.mktemp("robust")
    base, make_inputs = tiny_llama()
    (root / "base").mkdir()
    onnx_path = export_onnx(base, make_inputs(0), root / "base" / "model.onnx", dynamo=False)
    return root, onnx_path, _adapter(root / "ad")


def _adapter(directory: Path, **config) -> Path:
    rng = np.random.default_rng(0)
    t = LoraTarget(Q0, "linear", rng.normal(size=(2, 32)).astype(np.float32), np.ones((32, 2), np.float32), 1.0)
    save_adapter_files(Adapter({Q0: t}, LoraConfig(r=2, target_modules=["q_proj"], **config)), directory)
    return directory


def _invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _refused(result, fragment: str, code: int = 2) -> None:
    """Exit ``code``, exactly one ``error:`` line on stderr containing ``fragment``, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    if result.stdout:  # with --json, the error also goes to stdout as one JSON object
        assert json.loads(result.stdout)["error"] == lines[0][len("error: ") :]
        assert result.stdout.count("\n") == 1


def _no_strays(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# -- outputs that would replace an input ----------------------------------------------------------


def test_merge_output_over_the_adapter_is_refused(setup):
    root, onnx_path, adapter = setup
    before = file_hashes(onnx_path, adapter)
    result = _invoke("merge", onnx_path, adapter, "-o", adapter / "adapter_model.safetensors")
    _refused(result, "overwrite")
    assert file_hashes(onnx_path, adapter) == before
    _no_strays(adapter)


def test_merge_output_over_base_weights_is_refused(setup, tmp_path):
    root, onnx_path, adapter = setup
    weights = tmp_path / "w.safetensors"
    shutil.copy(adapter / "adapter_model.safetensors", weights)
    before = file_hashes(weights)
    _refused(_invoke("merge", onnx_path, adapter, "-o", weights, "--base-weights", weights), "overwrite")
    assert file_hashes(weights) == before


@pytest.mark.parametrize("external", [False, True])
def test_inject_into_the_base_models_folder_is_refused(setup, tmp_path, external):
    root, onnx_path, adapter = setup
    folder = tmp_path / "base"
    folder.mkdir()
    if external:
        import onnx

        onnx.save(onnx.load(onnx_path), folder / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    else:
        shutil.copy(onnx_path, folder / "model.onnx")
    before = file_hashes(folder / "model.onnx")
    _refused(_invoke("inject", folder / "model.onnx", adapter, "-o", folder), "overwrite the input")
    assert file_hashes(folder / "model.onnx") == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(p).name for p in before)


def test_convert_output_over_the_adapter_is_refused(setup, tmp_path):
    root, onnx_path, adapter = setup
    assert _invoke("inject", onnx_path, adapter, "-o", tmp_path / "served").exit_code == 0
    weights = adapter / "adapter_model.safetensors"
    before = file_hashes(adapter)
    _refused(_invoke("convert", weights, "--model", tmp_path / "served" / "model.onnx", "-o", weights), "overwrite")
    assert file_hashes(adapter) == before


def test_merge_file_into_a_directory_is_a_one_line_error(setup, tmp_path):
    _, onnx_path, adapter = setup
    (tmp_path / "out.onnx").mkdir()
    with pytest.raises(ModelError, match="is a directory"):
        merge_file(onnx_path, adapter, tmp_path / "out.onnx")
    _no_strays(tmp_path)


# -- malformed adapter_config.json and adapter tensors --------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"rank_pattern": [1, 2]}, "rank_pattern must be an object"),
        ({"alpha_pattern": "q_proj"}, "alpha_pattern must be an object"),
        ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
        ({"target_modules": 5}, "target_modules must be"),
        ({"target_modules": ["q_proj", None]}, "target_modules must be"),
    ],
)
def test_malformed_config_is_refused(setup, tmp_path, change, fragment):
    _, onnx_path, adapter = setup
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    _refused(_invoke("merge", onnx_path, bad, "-o", tmp_path / "m.onnx"), fragment)
    assert not (tmp_path / "m.onnx").exists()


def _raw_safetensors(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + payload


_A = f"base_model.model.{Q0}.lora_A.weight"
_B = f"base_model.model.{Q0}.lora_B.weight"


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        # Integer LoRA weights would merge as garbage.
        ({_A: np.ones((2, 32), np.int32), _B: np.ones((32, 2), np.int32)}, "expected floating point"),
        ({_A: np.ones((2, 32), bool), _B: np.ones((32, 2), bool)}, "expected floating point"),
        # A 0-d tensor has no rank axis.
        ({_A: np.array(1.0, np.float32), _B: np.array(1.0, np.float32)}, "expected at least 2-D"),
        # 2**40 x 2**40 overflows int64 to 0 elements, which matched the empty payload.
        (_raw_safetensors({_A: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}}), "corrupt"),
        (
            _raw_safetensors({"__metadata__": ["x"], _A: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}),
            "corrupt",
        ),
    ],
    ids=["int32", "bool", "scalar", "shape-overflow", "metadata-list"],
)
def test_malformed_adapter_tensors_are_refused(setup, tmp_path, tensors, fragment):
    from safetensors.numpy import save

    _, onnx_path, adapter = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(adapter / "adapter_config.json", bad)
    (bad / "adapter_model.safetensors").write_bytes(tensors if isinstance(tensors, bytes) else save(tensors))
    before = file_hashes(bad)
    _refused(_invoke("merge", onnx_path, bad, "-o", tmp_path / "m.onnx"), fragment)
    assert file_hashes(bad) == before and not (tmp_path / "m.onnx").exists()


# -- models, usage, verify, export ----------------------------------------------------------------


def test_empty_onnx_file_is_not_a_model(tmp_path, setup):
    _, _, adapter = setup
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _refused(_invoke("inspect", empty, "--json"), "not an ONNX model")
    _refused(_invoke("merge", empty, adapter, "-o", tmp_path / "m.onnx"), "not an ONNX model")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["merge"], "Missing argument"),
        (["merge", "{base}", "{ad}", "-o", "{tmp}"], "is a directory"),
        (["merge", "{base}", "{ad}", "-o", "{tmp}/m.onnx", "--bogus"], "No such option"),
        (["verify", "{base}", "--rtol", "x"], "not a valid float"),
        (["nonsense"], "No such command"),
        (["--bogus"], "No such option"),
    ],
)
def test_usage_errors_are_one_line(setup, tmp_path, args, fragment):
    _, onnx_path, adapter = setup
    args = [a.format(base=onnx_path, ad=adapter, tmp=tmp_path) for a in args]
    _refused(_invoke(*args), fragment)


def test_bare_command_still_shows_help():
    result = _invoke()
    assert "Commands:" in result.output and "merge" in result.output


@pytest.mark.parametrize("tol", [["--atol", "nan"], ["--rtol", "nan"], ["--rtol", "-1"]])
def test_verify_refuses_nan_tolerance(setup, tol):
    _, onnx_path, _ = setup
    _refused(_invoke("verify", onnx_path, onnx_path, *tol), "finite and non-negative")


def test_verify_inference_failure_is_one_line_even_from_onnxruntime(setup, tmp_path, capfd):
    _, onnx_path, _ = setup
    ids = np.full((2, 7), 10**6, np.int64)  # out of the embedding's range: ORT fails inside Gather
    np.savez(tmp_path / "x.npz", input_ids=ids, attention_mask=np.ones((2, 7), np.int64))
    result = _invoke("verify", onnx_path, onnx_path, "--inputs", tmp_path / "x.npz")
    _refused(result, "inference failed")
    # ONNX Runtime's own logger writes to the process's stderr (fd 2), beside our one line.
    assert "onnxruntime" not in capfd.readouterr().err


def test_export_failure_logs_nothing_but_the_error(tmp_path, monkeypatch):
    (tmp_path / "robust_mods.py").write_text(
        "import torch\n\ndef mismatched():\n    return torch.nn.Linear(2, 2), (torch.zeros(3, 3),)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    torch_log = logging.getLogger("torch")
    torch_log.addHandler(handler)
    try:
        result = _invoke("export", "robust_mods:mismatched", tmp_path / "out" / "m.onnx")
    finally:
        torch_log.removeHandler(handler)
    _refused(result, "export failed")
    assert [r.getMessage()[:80] for r in records] == []
    assert not (tmp_path / "out" / "m.onnx").exists()
    _no_strays(tmp_path / "out")


def test_merge_twice_is_byte_identical_and_json_parses(setup, tmp_path):
    _, onnx_path, adapter = setup
    outs = []
    for name in ("a.onnx", "b.onnx"):
        result = _invoke("merge", onnx_path, adapter, "-o", tmp_path / name, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["counts"]["merged_weights"] == 1
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]


def test_inject_names_an_adapter_given_as_dot_after_its_folder(setup, tmp_path, monkeypatch):
    _, onnx_path, adapter = setup
    monkeypatch.chdir(adapter)
    result = _invoke("inject", onnx_path, ".", "-o", tmp_path / "served")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "served").iterdir()) == [
        ".lora-export.json",
        "ad.onnx_adapter",
        "ad.safetensors",
        "model.onnx",
    ]


@pytest.mark.parametrize("manifest", ['{"slots": [], "absent": 5}', '{"slots": 5}', "[1]", "{"])
def test_convert_refuses_a_corrupt_slot_manifest(setup, tmp_path, manifest):
    import onnx

    _, onnx_path, adapter = setup
    assert _invoke("inject", onnx_path, adapter, "-o", tmp_path / "served").exit_code == 0
    model = onnx.load(tmp_path / "served" / "model.onnx")
    for prop in model.metadata_props:
        if prop.key == "lora_export.slots":
            prop.value = manifest
    onnx.save(model, tmp_path / "corrupt.onnx")
    result = _invoke("convert", adapter, "--model", tmp_path / "corrupt.onnx", "-o", tmp_path / "x.safetensors")
    _refused(result, "corrupt lora_export.slots metadata")
    assert not (tmp_path / "x.safetensors").exists()


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).with_name("PWNED-never-created"),))


def test_malicious_pickle_adapter_is_refused_in_one_line(setup, tmp_path):
    import pickle

    _, onnx_path, adapter = setup
    bad = tmp_path / "pkl"
    bad.mkdir()
    shutil.copy(adapter / "adapter_config.json", bad)
    (bad / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil()}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        # torch warned about the pickle protocol on stderr, a second line beside ours.
        warnings.simplefilter("always")
        _refused(_invoke("merge", onnx_path, bad, "-o", tmp_path / "m.onnx"), "refused to load pickle file")
    assert [str(w.message)[:60] for w in caught] == []
    assert not Path(__file__).with_name("PWNED-never-created").exists()
    assert not (tmp_path / "m.onnx").exists()

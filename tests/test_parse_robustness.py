"""Hostile adapter configs, safetensors headers and metadata JSON: one-line LoraExportErrors, never a
traceback or a hang; adapters whose scaled tensors overflow are refused by every writer."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from robust_fixtures import write_adapter, write_model

from lora_export import LoraConfig, load_adapter
from lora_export.errors import AdapterError, ConfigError, LoraExportError, ModelError
from lora_export.safetensors_io import read_safetensors
from lora_export.slots import SlotManifest

EVIL = "(a+)+$"
LONG_NAME = "a" * 5000 + "!"


def _config_dir(tmp_path: Path, **overrides) -> Path:
    directory = write_adapter(tmp_path / "ad")
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(overrides)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    return directory


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "\r" not in text, text
    return text


# -- 1. regexes run in linear time -------------------------------------------------------------------


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_catastrophic_target_regex_does_not_hang(field):
    cfg = LoraConfig(**{"target_modules": EVIL, field: EVIL})
    start = time.monotonic()
    assert not cfg.is_target(LONG_NAME)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_catastrophic_pattern_key_does_not_hang(field):
    cfg = LoraConfig(r=4, **{field: {EVIL: 2}})
    start = time.monotonic()
    assert cfg.rank_for(LONG_NAME) == 4 and cfg.alpha_for(LONG_NAME) == 8.0
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("pattern", [r"(q)\1", r"(?=q)proj", r"(?<!k)_proj", r"q(?!x)"])
def test_regex_without_linear_matcher_is_a_config_error(pattern):
    with pytest.raises(ConfigError, match="linear-time") as e:
        LoraConfig(target_modules=pattern)
    _one_line(e.value)
    with pytest.raises(ConfigError, match="linear-time"):
        LoraConfig(rank_pattern={pattern: 2})


def test_invalid_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        LoraConfig(exclude_modules="(unclosed")


def test_regex_semantics_follow_peft():
    cfg = LoraConfig(r=8, target_modules=r".*\.(q|v)_proj", rank_pattern={"q_proj": 2, r"layers\.1\..*": 4})
    assert cfg.is_target("model.layers.0.q_proj") and not cfg.is_target("q_proj")
    assert not cfg.is_target("model.layers.0.q_proj.x")
    assert cfg.rank_for("model.layers.0.q_proj") == 2
    assert cfg.rank_for("model.layers.0.xq_proj") == 8  # a suffix is whole path components
    assert cfg.rank_for("model.layers.1.k_proj") == 4
    # A key with "|" parses inside PEFT's template exactly as PEFT does: the first branch is unanchored.
    assert LoraConfig(r=8, rank_pattern={"a)|(b": 2}).rank_for("a.zzz") == 2


def test_modules_to_save_with_regex_characters_is_literal():
    cfg = LoraConfig(target_modules=["fc"], modules_to_save=["(a+)+$"])
    assert cfg.is_target("x.fc")
    assert not cfg.is_target("(a+)+$.fc")


# -- 2. ill-typed and non-finite config fields --------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"r": float("inf")}, "r must be an integer"),
        ({"r": float("nan")}, "r must be an integer"),
        ({"r": 2.5}, "r must be an integer"),
        ({"r": "8"}, "r must be an integer"),
        ({"r": [2]}, "r must be an integer"),
        ({"r": True}, "r must be an integer"),
        ({"r": 10**30}, "r must be a positive integer"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be finite"),
        ({"lora_alpha": 10**400}, "lora_alpha must be finite"),
        ({"lora_alpha": "16"}, "lora_alpha must be a number"),
        ({"lora_dropout": float("nan")}, "lora_dropout"),
        ({"rank_pattern": {"fc": float("inf")}}, "rank_pattern"),
        ({"rank_pattern": {"fc": 0}}, "rank_pattern"),
        ({"rank_pattern": [1]}, "rank_pattern must be an object"),
        ({"alpha_pattern": {"fc": float("nan")}}, "alpha_pattern"),
        ({"alpha_pattern": {"fc": None}}, "alpha_pattern"),
        ({"target_modules": {"fc": 1}}, "target_modules"),
        ({"target_modules": [1, 2]}, "target_modules"),
        ({"exclude_modules": 5}, "exclude_modules"),
        ({"modules_to_save": 5}, "modules_to_save"),
        ({"modules_to_save": [None]}, "modules_to_save"),
        ({"modules_to_save": "x"}, "modules_to_save"),
        ({"bias": 7}, "bias"),
        ({"peft_type": ["LORA"]}, "not supported"),
    ],
)
def test_ill_typed_config_field_is_a_config_error(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_adapter(_config_dir(tmp_path, **overrides))
    assert fragment in _one_line(e.value)


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_rank_literal_is_a_config_error(tmp_path, literal):
    directory = _config_dir(tmp_path)
    text = (directory / "adapter_config.json").read_text().replace('"r": 2', f'"r": {literal}')
    (directory / "adapter_config.json").write_text(text)
    with pytest.raises(ConfigError):
        load_adapter(directory)


def test_integral_float_rank_is_accepted(tmp_path):
    assert load_adapter(_config_dir(tmp_path, r=2.0)).config.r == 2


# -- 2. deeply nested or oversized JSON ---------------------------------------------------------------


def test_deeply_nested_adapter_config_is_a_config_error(tmp_path):
    directory = write_adapter(tmp_path / "ad")
    (directory / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_adapter(directory)


def test_nested_value_in_config_field_gives_a_short_message(tmp_path):
    nested = json.loads("[" * 500 + "]" * 500)
    with pytest.raises(ConfigError) as e:
        load_adapter(_config_dir(tmp_path, target_modules=nested))
    assert len(_one_line(e.value)) < 300


def test_huge_integer_literal_is_a_config_error(tmp_path):
    directory = write_adapter(tmp_path / "ad")
    (directory / "adapter_config.json").write_text('{"r": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_adapter(directory)


def _safetensors(path: Path, header: object | bytes, payload: bytes = b"") -> Path:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + payload)
    return path


def test_deeply_nested_safetensors_header_is_an_adapter_error(tmp_path):
    path = _safetensors(tmp_path / "x.safetensors", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(AdapterError, match="unparsable header"):
        read_safetensors(path)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]},  # more dims than numpy holds
        {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]},  # empty, but too large a shape
        {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]},  # product overflows int64
        {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
        {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e999]},
        "not an object",
    ],
)
def test_bad_safetensors_entry_is_an_adapter_error(tmp_path, entry):
    path = _safetensors(tmp_path / "x.safetensors", {"t": entry}, b"\0" * 8)
    with pytest.raises(AdapterError, match="corrupt"):
        read_safetensors(path)


def test_non_string_safetensors_metadata_is_an_adapter_error(tmp_path):
    path = _safetensors(tmp_path / "x.safetensors", {"__metadata__": {"k": [1]}})
    with pytest.raises(AdapterError, match="__metadata__"):
        read_safetensors(path)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"slots": [{"module": "m", "kind": "linear"}]}),
        json.dumps({"slots": "x"}),
        json.dumps({"slots": [1]}),
    ],
)
def test_corrupt_slot_manifest_is_a_model_error(text):
    with pytest.raises(ModelError, match="corrupt lora_export.slots"):
        SlotManifest.from_json(text)


def _slot(**changes) -> dict:
    base = dict(module="fc", kind="linear", op="Gemm", node="n", weight="w", weight_shape=[6, 4], dtype="float32",
                a="fc.lora_A", b="fc.lora_B", dora=None, groups=1)  # fmt: skip
    return {**base, **changes}


@pytest.mark.parametrize(
    "changes",
    [
        {"weight_shape": "64"},
        {"weight_shape": [6]},
        {"weight_shape": [6, 4.5]},
        {"weight_shape": [6, -4]},
        {"kind": "attention"},
        {"dtype": "int64"},
        {"dtype": "no-such-type"},
        {"dtype": 3},
        {"groups": 0},
        {"a": None},
        {"dora": 7},
    ],
)
def test_ill_typed_slot_is_a_model_error(changes):
    with pytest.raises(ModelError, match="corrupt lora_export.slots"):
        SlotManifest.from_json(json.dumps({"version": 1, "slots": [_slot(**changes)]}))


def test_well_formed_slot_is_accepted():
    assert SlotManifest.from_json(json.dumps({"version": 1, "slots": [_slot()]})).slots["fc"].weight_shape == [6, 4]


# -- 4. non-finite scaled tensors ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    from lora_export.inject import inject_files

    root = tmp_path_factory.mktemp("nonfinite")
    model = write_model(root / "base" / "model.onnx")
    adapter = write_adapter(root / "fine")
    inject_files(model, [adapter], root / "inj")
    return root, model


def test_inject_refuses_adapter_that_overflows_when_scaled(tmp_path, injected):
    from lora_export.inject import inject_files

    _, model = injected
    adapter = write_adapter(tmp_path / "huge", b_value=3e38, lora_alpha=4)  # scale 2: B·2 = Inf in float32
    with pytest.raises(AdapterError, match="NaN or Inf") as e:
        inject_files(model, [adapter], tmp_path / "out")
    _one_line(e.value)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_convert_refuses_adapter_that_overflows_when_scaled(tmp_path, injected):
    from lora_export.convert import convert_adapter

    root, _ = injected
    adapter = write_adapter(tmp_path / "huge", b_value=3e38, lora_alpha=4)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        convert_adapter(adapter, root / "inj" / "model.onnx", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_session_refuses_non_finite_slot_tensors(tmp_path, injected):
    from lora_export.adapter_files import read_adapter_tensors, write_adapter_tensors
    from lora_export.session import LoraSession

    root, _ = injected
    session = LoraSession(root / "inj" / "model.onnx", providers=["CPUExecutionProvider"])
    good = read_adapter_tensors(root / "inj" / "fine.safetensors")
    session.load_adapter("ok", good)
    for suffix in (".safetensors", ".onnx_adapter"):
        bad = {k: v.copy() for k, v in good.items()}
        key = sorted(bad)[0]
        bad[key].flat[0] = np.nan
        path = write_adapter_tensors(tmp_path / f"bad{suffix}", bad)
        with pytest.raises(AdapterError, match="NaN or Inf"):
            session.load_adapter(f"bad{suffix}", path)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        session.load_adapter("dict", {k: np.full_like(v, np.inf) for k, v in good.items()})
    huge = write_adapter(tmp_path / "huge", b_value=3e38, lora_alpha=4)
    with pytest.raises(LoraExportError, match="NaN or Inf"):
        session.load_adapter("huge", huge)
    assert session.adapters == ["ok"]

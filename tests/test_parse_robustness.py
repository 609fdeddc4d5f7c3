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
from lora_export.formats.safetensors import read_safetensors
from lora_export.graph.model.slot_manifest import SlotManifest

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
        json.dumps({"slots": [], "absent": json.loads("[" * 900 + "]" * 900)}),
        json.dumps({"slots": [], "absent": "fc"}),
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
    from lora_export.graph.verbs.inject import inject_files

    root = tmp_path_factory.mktemp("nonfinite")
    model = write_model(root / "base" / "model.onnx")
    adapter = write_adapter(root / "fine")
    inject_files(model, [adapter], root / "inj")
    return root, model


def test_inject_refuses_adapter_that_overflows_when_scaled(tmp_path, injected):
    from lora_export.graph.verbs.inject import inject_files

    _, model = injected
    adapter = write_adapter(tmp_path / "huge", b_value=3e38, lora_alpha=4)  # scale 2: B·2 = Inf in float32
    with pytest.raises(AdapterError, match="NaN or Inf") as e:
        inject_files(model, [adapter], tmp_path / "out")
    _one_line(e.value)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_convert_refuses_adapter_that_overflows_when_scaled(tmp_path, injected):
    from lora_export.graph.verbs.convert import convert_adapter

    root, _ = injected
    adapter = write_adapter(tmp_path / "huge", b_value=3e38, lora_alpha=4)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        convert_adapter(adapter, root / "inj" / "model.onnx", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_session_refuses_non_finite_slot_tensors(tmp_path, injected):
    from lora_export.formats.adapter_files import read_adapter_tensors, write_adapter_tensors
    from lora_export.runtime.session import LoraSession

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


# -- 2. corrupt ONNX models: one validation pass at load time -----------------------------------------


def _set(proto, index: int, array: np.ndarray) -> None:
    from onnx import numpy_helper

    proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, proto.graph.initializer[index].name))


def _raw_short(p):
    p.graph.initializer[1].raw_data = p.graph.initializer[1].raw_data[:-4]


def _raw_long(p):
    p.graph.initializer[1].raw_data += b"\0" * 4


def _typed_short(p):
    t = p.graph.initializer[1]
    values = np.frombuffer(t.raw_data, np.float32)
    t.ClearField("raw_data")
    t.float_data[:] = values[:-1].tolist()


def _negative_dim(p):
    p.graph.initializer[1].dims[0] = -6


def _undefined_dtype(p):
    p.graph.initializer[1].data_type = 0


def _no_inputs(p):
    for n in p.graph.node:
        del n.input[:]


def _empty_inputs(p):
    for n in p.graph.node:
        n.input[:] = [""] * len(n.input)


def _conv_without_weight(p):
    from onnx import helper

    p.graph.node.append(helper.make_node("Conv", ["y"], ["z"], name="/conv/Conv"))


def _string_attribute(p):
    from onnx import helper

    p.graph.node[1].attribute[0].CopyFrom(helper.make_attribute("transB", "yes"))


def _float_axis(p):
    from onnx import helper

    p.graph.node[0].attribute.append(helper.make_attribute("axis", 1.5))


def _manifest(value: str):
    def mutate(p):
        entry = p.metadata_props.add()
        entry.key, entry.value = "lora_export.manifest", value

    return mutate


def _slots_deep(p):
    entry = p.metadata_props.add()
    entry.key, entry.value = "lora_export.slots", "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (_raw_short, "92 bytes of data"),
        (_raw_long, "100 bytes of data"),
        (_typed_short, "23 values in float_data"),
        (_negative_dim, "invalid shape"),
        (_undefined_dtype, "undefined data type"),
        (_no_inputs, "required input 0 is missing"),
        (_empty_inputs, "required input 0 is missing"),
        (_conv_without_weight, "required input 1 is missing"),
        (_string_attribute, "attribute transB must be INT"),
        (_float_axis, "attribute axis must be INT"),
        (_manifest("[" * 100_000 + "]" * 100_000), "corrupt lora_export.manifest"),
        (_manifest('{"modules": {"fc": {"initializer": ["x"]}}}'), "corrupt lora_export.manifest"),
        (_manifest('{"modules": {"fc": 5}}'), "corrupt lora_export.manifest"),
        (_slots_deep, "corrupt lora_export.slots"),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_corrupt_onnx_model_is_a_model_error_at_load(tmp_path, mutate, fragment):
    from robust_fixtures import tiny_model

    from lora_export import merge_file
    from lora_export.graph.verbs.inspect import inspect_model

    proto = tiny_model()
    mutate(proto)
    model = write_model(tmp_path / "m.onnx", proto)
    adapter = write_adapter(tmp_path / "ad")
    for call in (lambda: inspect_model(model, adapter), lambda: merge_file(model, adapter, tmp_path / "o.onnx")):
        with pytest.raises(ModelError) as e:
            call()
        assert fragment in _one_line(e.value)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_non_float_target_weight_is_a_model_error_when_read(tmp_path, dtype):
    from robust_fixtures import tiny_model

    from lora_export import merge_file

    proto = tiny_model()
    _set(proto, 1, np.ones((6, 4), dtype))
    model = write_model(tmp_path / "m.onnx", proto)
    with pytest.raises(ModelError, match="floating-point weight"):
        merge_file(model, write_adapter(tmp_path / "ad"), tmp_path / "o.onnx")


@pytest.mark.parametrize("shape", [(), (6,), (6, 4, 1)])
def test_target_weight_of_wrong_rank_is_refused(tmp_path, shape):
    from robust_fixtures import tiny_model

    from lora_export import merge_file

    proto = tiny_model()
    _set(proto, 1, np.ones(shape, np.float32))
    model = write_model(tmp_path / "m.onnx", proto)
    with pytest.raises(LoraExportError):
        merge_file(model, write_adapter(tmp_path / "ad"), tmp_path / "o.onnx")


def test_invalid_utf8_node_name_is_a_model_error(tmp_path):
    from robust_fixtures import tiny_model

    from lora_export.graph.model.model_io import load_model

    proto = tiny_model()
    proto.graph.node[1].name = "/fc/NAMEX"
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString().replace(b"NAMEX", b"\xff\xfeMEX"))
    with pytest.raises(ModelError, match="not valid UTF-8"):
        load_model(path)


def test_session_refuses_slot_metadata_that_disagrees_with_the_graph(tmp_path, injected):
    """Slot metadata saying bfloat16 on a float32 graph: one DtypeError line, not ORT's RuntimeError."""
    import onnx

    from lora_export.runtime.session import LoraSession

    root, _ = injected
    proto = onnx.load(str(root / "inj" / "model.onnx"))
    meta = next(p for p in proto.metadata_props if p.key == "lora_export.slots")
    manifest = json.loads(meta.value)
    manifest["slots"][0]["dtype"] = "bfloat16"
    meta.value = json.dumps(manifest)
    path = write_model(tmp_path / "m.onnx", proto)
    session = LoraSession(path, providers=["CPUExecutionProvider"])
    from lora_export.errors import DtypeError

    with pytest.raises(DtypeError, match="the model expects tensor\\(float\\)"):
        session.load_adapter("a", root / "fine")


@pytest.mark.parametrize("table", ["int64", "string"])
def test_inject_refuses_non_float_target_weight(tmp_path, table):
    """An int64 weight used to get int64 slots (A′, B′ truncated, exit 0); a string table crashed."""
    from onnx import TensorProto, helper
    from robust_fixtures import tiny_model

    from lora_export.graph.verbs.inject import inject_files

    proto = tiny_model()
    if table == "int64":
        _set(proto, 1, np.ones((6, 4), np.int64))
    else:
        proto.graph.initializer[0].CopyFrom(helper.make_tensor("emb.weight", TensorProto.STRING, [10, 4], [b"a"] * 40))
    model = write_model(tmp_path / "m.onnx", proto)
    with pytest.raises(ModelError, match="floating-point weight"):
        inject_files(model, [write_adapter(tmp_path / "ad")], tmp_path / "out")
    assert not (tmp_path / "out").exists()

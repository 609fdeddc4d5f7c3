"""Property: on hostile input, every public entry point either succeeds or raises a LoraExportError, with
no other exception and no hang. Fuzzed: adapter_config.json values, safetensors headers, and ONNX files
(byte flips and field mutations of a small real model). Derandomized and small by default; the
``slow``-marked variants run many more examples."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from robust_fixtures import conv_model, tiny_model, write_adapter, write_conv_adapter, write_model

from lora_export import LoraConfig, load_adapter, merge_file
from lora_export.errors import LoraExportError
from lora_export.formats.safetensors import read_safetensors
from lora_export.graph.model.model_io import load_model
from lora_export.graph.targets.resolve import resolve_targets
from lora_export.graph.verbs.inject import inject_files
from lora_export.graph.verbs.inspect import inspect_model

FAST = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
SLOW = settings(FAST, max_examples=1500)
HANG_SECONDS = 20


@contextlib.contextmanager
def _no_hang(seconds: int = HANG_SECONDS):
    """Fail (instead of hanging the suite) when one example runs longer than ``seconds``."""

    def alarm(*_):
        raise TimeoutError(f"no result after {seconds}s: a hang")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _succeeds_or_refuses(call) -> None:
    with _no_hang():
        try:
            call()
        except LoraExportError as e:
            assert "\n" not in str(e), str(e)


@pytest.fixture(scope="module")
def workdir():
    root = Path(tempfile.mkdtemp(prefix="lora-fuzz-"))
    write_adapter(root / "adapter")
    write_conv_adapter(root / "conv_adapter")
    write_model(root / "base.onnx")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _fresh(root: Path, name: str) -> Path:
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


# -- adapter_config.json ------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["(a+)+$", r"(q)\1", "(?=x)", "fc", "emb", ".*", "[", "all-linear", "LORA", "gaussian"]),
)
_JSON = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
_CONFIG_KEYS = [
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
    "use_rslora", "use_dora", "init_lora_weights", "bias", "modules_to_save", "fan_in_fan_out", "peft_type",
    "layers_to_transform", "lora_bias", "target_parameters",
]  # fmt: skip
_PATTERN_MAPS = st.dictionaries(st.sampled_from(["fc", "emb", "(a+)+$", r"(q)\1", "f.", "["]), _SCALARS, max_size=3)


def _config_case(root: Path, changes: dict) -> None:
    directory = _fresh(root, "cfg")
    for f in (root / "adapter").iterdir():
        shutil.copy(f, directory / f.name)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(changes)
    (directory / "adapter_config.json").write_text(json.dumps(cfg, allow_nan=True))

    def run():
        adapter = load_adapter(directory)
        for name in ("fc", "emb", "a" * 3000 + "!", "x.fc", "\udcff.fc"):
            adapter.config.is_target(name)
            adapter.config.scale_for(name)

    _succeeds_or_refuses(run)


_CONFIG_CHANGES = st.dictionaries(
    st.sampled_from(_CONFIG_KEYS),
    st.one_of(_JSON, _PATTERN_MAPS),
    max_size=5,
)


@FAST
@given(changes=_CONFIG_CHANGES)
def test_fuzz_adapter_config(workdir, changes):
    _config_case(workdir, changes)


@pytest.mark.slow
@SLOW
@given(changes=_CONFIG_CHANGES)
def test_fuzz_adapter_config_long(workdir, changes):
    _config_case(workdir, changes)


@FAST
@given(fields=st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(LoraConfig)]), _JSON, max_size=4))
def test_fuzz_lora_config_constructor(fields):
    with _no_hang():
        try:
            LoraConfig(**fields).is_target("a" * 3000)
        except LoraExportError:
            pass


# -- safetensors headers ------------------------------------------------------------------------------

_DIM = st.one_of(st.integers(min_value=0, max_value=8), st.integers(min_value=-(2**65), max_value=2**65), _SCALARS)
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F64", "X9"]), _SCALARS),
        "shape": st.one_of(st.lists(_DIM, max_size=70), _JSON),
        "data_offsets": st.one_of(st.lists(_DIM, min_size=0, max_size=3), _JSON),
    }
)
_HEADER = st.dictionaries(st.text(max_size=8), st.one_of(_ENTRY, _JSON), max_size=4)


def _safetensors_case(root: Path, header: dict, metadata, payload: int, length_delta: int, raw: bytes | None) -> None:
    if metadata is not None:
        header = {**header, "__metadata__": metadata}
    head = raw if raw is not None else json.dumps(header, allow_nan=True).encode()
    path = root / "x.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(head) + length_delta)) + head + b"\x01" * payload)
    _succeeds_or_refuses(lambda: read_safetensors(path))


_SAFETENSORS_ARGS = dict(
    header=_HEADER,
    metadata=st.one_of(st.none(), _JSON),
    payload=st.integers(min_value=0, max_value=256),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40]),
    raw=st.one_of(st.none(), st.binary(max_size=64)),
)


@FAST
@given(**_SAFETENSORS_ARGS)
def test_fuzz_safetensors_header(workdir, header, metadata, payload, length_delta, raw):
    _safetensors_case(workdir, header, metadata, payload, length_delta, raw)


@pytest.mark.slow
@SLOW
@given(**_SAFETENSORS_ARGS)
def test_fuzz_safetensors_header_long(workdir, header, metadata, payload, length_delta, raw):
    _safetensors_case(workdir, header, metadata, payload, length_delta, raw)


# -- adapter tensors (valid safetensors files, hostile contents) ---------------------------------------

_P = "base_model.model."
_KEYS = st.sampled_from(
    [
        f"{_P}fc.lora_A.weight", f"{_P}fc.lora_B.weight", f"{_P}emb.lora_embedding_A", f"{_P}emb.lora_embedding_B",
        f"{_P}fc.lora_magnitude_vector", f"{_P}fc.bias", f"{_P}fc.lora_A.default.weight", "fc.lora_X.weight",
        f"{_P}proj.lora_A.weight", f"{_P}proj.lora_B.weight", f"{_P}fc.base_layer.bias",
        "modules_to_save.default.fc.bias",
    ]
)  # fmt: skip
_ARRAYS = st.tuples(
    st.sampled_from([np.float32, np.float16, np.float64, np.int64, np.bool_, np.uint8]),
    st.lists(st.integers(min_value=0, max_value=7), max_size=4),
    st.sampled_from([0.0, 1.0, -2.5, 1e30, 3e38, np.inf, np.nan]),
)


def _adapter_tensors_case(root: Path, entries: dict, config: dict) -> None:
    from lora_export.formats.safetensors import write_safetensors

    directory = _fresh(root, "tensors")
    shutil.copy(root / "adapter" / "adapter_config.json", directory)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    with np.errstate(all="ignore"):
        tensors = {k: np.full(shape, fill).astype(dtype) for k, (dtype, shape, fill) in entries.items()}
        write_safetensors(directory / "adapter_model.safetensors", tensors)
    out = _fresh(root, "tensors-out")
    for call in (
        lambda: merge_file(root / "base.onnx", directory, out / "merged.onnx"),
        lambda: inject_files(root / "base.onnx", [directory], out / "injected"),
    ):
        _succeeds_or_refuses(call)


_TENSOR_ARGS = dict(
    entries=st.dictionaries(_KEYS, _ARRAYS, max_size=6),
    config=st.fixed_dictionaries(
        {},
        optional={
            "r": st.integers(1, 8),
            "use_dora": st.booleans(),
            "fan_in_fan_out": st.booleans(),
            "bias": st.sampled_from(["none", "all"]),
            "lora_alpha": st.sampled_from([1, 16, 1e30, 1e-30]),
        },
    ),
)


@FAST
@given(**_TENSOR_ARGS)
def test_fuzz_adapter_tensors(workdir, entries, config):
    _adapter_tensors_case(workdir, entries, config)


@pytest.mark.slow
@settings(SLOW, max_examples=600)
@given(**_TENSOR_ARGS)
def test_fuzz_adapter_tensors_long(workdir, entries, config):
    _adapter_tensors_case(workdir, entries, config)


# -- ONNX files ---------------------------------------------------------------------------------------

_NAMES = st.one_of(
    st.sampled_from(["", "fc.weight", "emb.weight", "/fc/Gemm", "a\x1b[2J\r\n\x00b", "x" * 300, "fc", "ids", "y"]),
    st.text(max_size=10),
)


def _mutate(data: st.DataObject, proto: onnx.ModelProto, root: Path) -> bytes:
    """Apply a few drawn field mutations, then maybe flip bytes of the serialized model."""
    graph = proto.graph
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="mutations")):
        kind = data.draw(
            st.sampled_from(
                [
                    "drop_inputs",
                    "empty_input",
                    "dtype",
                    "dims",
                    "raw",
                    "external",
                    "name",
                    "op",
                    "attr",
                    "meta",
                    "dup",
                    "perm",
                ]
            )
        )
        node = graph.node[data.draw(st.integers(0, len(graph.node) - 1))]
        init = graph.initializer[data.draw(st.integers(0, len(graph.initializer) - 1))]
        if kind == "drop_inputs":
            del node.input[data.draw(st.integers(0, len(node.input))) :]
        elif kind == "empty_input" and node.input:
            node.input[data.draw(st.integers(0, len(node.input) - 1))] = ""
        elif kind == "dtype":
            init.data_type = data.draw(st.sampled_from([0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 14, 16, 17, 21, 22, 99]))
        elif kind == "dims":
            init.dims[:] = data.draw(st.lists(st.integers(-3, 12), max_size=4))
        elif kind == "raw":
            init.raw_data = data.draw(st.binary(max_size=128))
        elif kind == "external":
            target = root / "data.bin"
            target.write_bytes(b"\0" * data.draw(st.integers(0, 256)))
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            outside = str(root.parent / "secret.bin")  # absolute, in the temp dir: never a real system file
            entries = {"location": data.draw(st.sampled_from(["data.bin", "missing.bin", "../x", outside, ""]))}
            for key in ("offset", "length"):
                if data.draw(st.booleans()):
                    entries[key] = data.draw(st.sampled_from(["0", "8", "96", "-1", "abc", "99999999999"]))
            del init.external_data[:]
            for k, v in entries.items():
                e = init.external_data.add()
                e.key, e.value = k, v
        elif kind == "name":
            which = data.draw(st.sampled_from(["node", "init", "input", "output"]))
            name = data.draw(_NAMES)
            if which == "node":
                node.name = name
            elif which == "init":
                init.name = name
            elif which == "input" and node.input:
                node.input[0] = name
            elif node.output:
                node.output[0] = name
        elif kind == "op":
            node.op_type = data.draw(st.sampled_from(["MatMul", "Gemm", "Conv", "Gather", "Transpose", "Add"]))
        elif kind == "perm":
            del node.attribute[:]
            perm = data.draw(st.lists(st.integers(-1, 3), min_size=1, max_size=3))
            node.attribute.append(onnx.helper.make_attribute("perm", perm))
        elif kind == "attr":
            del node.attribute[:]
            value = data.draw(st.one_of(st.integers(-2, 3), st.floats(allow_nan=False), st.text(max_size=3)))
            name = data.draw(st.sampled_from(["transB", "axis", "group", "perm"]))
            node.attribute.append(onnx.helper.make_attribute(name, value))
        elif kind == "meta":
            entry = proto.metadata_props.add()
            entry.key = data.draw(st.sampled_from(["lora_export.manifest", "lora_export.slots", "other"]))
            entry.value = data.draw(st.one_of(st.text(max_size=20), _JSON.map(json.dumps)))
        elif kind == "dup":
            graph.initializer.append(init)
    raw = bytearray(proto.SerializeToString())
    for _ in range(data.draw(st.sampled_from([0, 0, 0, 1, 3]), label="byte flips")):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    return bytes(raw)


def _onnx_case(root: Path, data: st.DataObject) -> None:
    case = _fresh(root, "onnx")
    model = case / "model.onnx"
    conv = data.draw(st.booleans(), label="conv model")
    model.write_bytes(_mutate(data, conv_model() if conv else tiny_model(), case))
    adapter = root / ("conv_adapter" if conv else "adapter")

    def resolve():
        loaded = load_model(model)
        resolve_targets(loaded, load_adapter(adapter))

    for call in (
        resolve,
        lambda: inspect_model(model, adapter),
        lambda: merge_file(model, adapter, case / "merged.onnx"),
        lambda: inject_files(model, [adapter], case / "injected"),
    ):
        _succeeds_or_refuses(call)


@FAST
@given(data=st.data())
def test_fuzz_onnx_model(workdir, data):
    _onnx_case(workdir, data)


@pytest.mark.slow
@settings(SLOW, max_examples=400)
@given(data=st.data())
def test_fuzz_onnx_model_long(workdir, data):
    _onnx_case(workdir, data)


# -- injected models: slot metadata -> convert and LoraSession ----------------------------------------

_SLOT_FIELDS = {
    "kind": st.sampled_from(["linear", "conv", "embedding", "x", 3]),
    "weight_shape": st.one_of(st.lists(st.integers(-1, 12), max_size=4), _SCALARS),
    "dtype": st.sampled_from(["float32", "float16", "bfloat16", "float64", "int64", "nope", 1]),
    "groups": st.one_of(st.integers(-1, 4), _SCALARS),
    "a": _NAMES,
    "b": _NAMES,
    "dora": st.one_of(st.none(), _NAMES),
    "module": _NAMES,
    "node": _NAMES,
}


@pytest.fixture(scope="module")
def injected(workdir):
    inject_files(workdir / "base.onnx", [workdir / "adapter"], workdir / "inj")
    return onnx.load(str(workdir / "inj" / "model.onnx"))


def _slots_case(root: Path, injected: onnx.ModelProto, data: st.DataObject, session: bool) -> None:
    from lora_export.graph.verbs.convert import convert_adapter
    from lora_export.runtime.session import LoraSession

    proto = onnx.ModelProto()
    proto.CopyFrom(injected)
    meta = next(p for p in proto.metadata_props if p.key == "lora_export.slots")
    manifest = json.loads(meta.value)
    for slot in manifest["slots"]:
        for key, strategy in _SLOT_FIELDS.items():
            if data.draw(st.integers(0, 9)) == 0:
                slot[key] = data.draw(strategy)
    meta.value = json.dumps(manifest)
    case = _fresh(root, "slots")
    model = case / "model.onnx"
    model.write_bytes(proto.SerializeToString())
    _succeeds_or_refuses(lambda: convert_adapter(root / "adapter", model, case / "out.safetensors"))
    if session:

        def run():
            s = LoraSession(model, providers=["CPUExecutionProvider"])
            s.load_adapter("a", root / "adapter")
            s.load_adapter("b", root / "inj" / "adapter.safetensors")

        _succeeds_or_refuses(run)


@FAST
@given(data=st.data())
def test_fuzz_slot_metadata(workdir, injected, data):
    _slots_case(workdir, injected, data, session=False)


@pytest.mark.slow
@settings(SLOW, max_examples=300)
@given(data=st.data())
def test_fuzz_slot_metadata_long(workdir, injected, data):
    _slots_case(workdir, injected, data, session=True)


def test_fuzz_fixture_is_mergeable(workdir, tmp_path):
    """The unmutated model and adapter succeed: the fuzzers start from a working case."""
    report = merge_file(workdir / "base.onnx", workdir / "adapter", tmp_path / "m.onnx")
    assert report.to_dict()["counts"]["merged_weights"] == 2
    assert math.isfinite(float(np.asarray(load_adapter(workdir / "adapter").targets["fc"].scale)))

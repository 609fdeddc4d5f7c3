"""The files ``inject`` carries over from an onnxruntime-genai folder: one run's files only, links followed
under ONNX Runtime's rule (files.beside_model).

A stand-in genai folder (model.onnx + data, genai_config.json naming it, tokenizer files) in a temp
folder; stand-in "secret" files outside it. Running the output in onnxruntime-genai is covered by
tests/test_genai_runtime.py; here every byte of the output folder is compared with what it must hold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lora_export import Adapter, LoraConfig, LoraTarget, save_adapter_files
from lora_export.cli import cli

IN, OUT, R = 16, 8, 2


def _genai_folder(
    folder: Path, *, tokenizer: bytes = b'{"v": 1}', extra: dict | None = None, data: str = "model.onnx.data"
) -> Path:
    h = onnx.helper
    w = np.random.default_rng(0).standard_normal((IN, OUT)).astype(np.float32)
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, IN])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, OUT])
    node = h.make_node("MatMul", ["x", "q.weight"], ["y"], name="/q/MatMul")
    graph = h.make_graph([node], "g", [x], [y], initializer=[onnx.numpy_helper.from_array(w, "q.weight")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9)
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, location=data, size_threshold=0)
    config = {"model": {"decoder": {"filename": "model.onnx"}, "type": "test"}, **(extra or {})}
    (folder / "genai_config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_bytes(tokenizer)
    (folder / "special_tokens_map.json").write_text("{}")
    return folder / "model.onnx"


def _adapter(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    t = LoraTarget("q", "linear", A=rng.standard_normal((R, IN)).astype(np.float32),
                   B=rng.standard_normal((OUT, R)).astype(np.float32), scale=0.5)  # fmt: skip
    return save_adapter_files(Adapter({"q": t}, LoraConfig(r=R, lora_alpha=1.0), name="ad"), folder / "ad")


def _inject(base: Path, adapter: Path, out: Path):
    return CliRunner().invoke(cli, ["inject", str(base), str(adapter), "-o", str(out)])


def _config(out: Path) -> dict:
    return json.loads((out / "genai_config.json").read_text())


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_reinject_after_the_genai_folder_changed_holds_only_the_new_run(tmp_path):
    adapter = _adapter(tmp_path)
    base = _genai_folder(tmp_path / "g", tokenizer=b'{"v": 1}', extra={"search": {"max_length": 10}})
    out = tmp_path / "out"
    assert _inject(base, adapter, out).exit_code == 0
    (out / "mine.txt").write_text("the user's own file")
    assert _config(out)["search"] == {"max_length": 10}
    # The genai folder changes: a new config and tokenizer, one file fewer.
    (base.parent / "genai_config.json").write_text(
        json.dumps({"model": {"decoder": {"filename": "model.onnx"}, "type": "test"}, "search": {"max_length": 20}})
    )
    (base.parent / "tokenizer.json").write_bytes(b'{"v": 2}')
    (base.parent / "special_tokens_map.json").unlink()
    res = _inject(base, adapter, out)
    assert res.exit_code == 0, res.output
    assert _config(out)["search"] == {"max_length": 20}
    assert (out / "tokenizer.json").read_bytes() == b'{"v": 2}'
    assert not (out / "special_tokens_map.json").exists()
    assert (out / "mine.txt").read_text() == "the user's own file"
    # Exactly what a fresh inject into an empty folder writes, plus the user's file.
    fresh = tmp_path / "fresh"
    assert _inject(base, adapter, fresh).exit_code == 0
    assert {k: v for k, v in _files(out).items() if k != "mine.txt"} == _files(fresh)


def test_reinject_from_a_plain_model_drops_the_genai_files(tmp_path):
    adapter = _adapter(tmp_path)
    base = _genai_folder(tmp_path / "g")
    out = tmp_path / "out"
    assert _inject(base, adapter, out).exit_code == 0
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(base.parent / name, plain / name)
    assert _inject(plain / "model.onnx", adapter, out).exit_code == 0
    assert not {"genai_config.json", "tokenizer.json", "special_tokens_map.json"} & set(os.listdir(out))


def _hf_cache(root: Path, src: Path, outside: dict[str, Path] | None = None) -> Path:
    """``root/snapshots/v/<name> -> ../../blobs/<n>`` for each file of ``src``'s folder, except those in
    ``outside`` (linked to that path instead)."""
    outside = outside or {}
    snap = root / "snapshots" / "v"
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for i, p in enumerate(sorted(src.parent.iterdir())):
        if p.name in outside:
            (snap / p.name).symlink_to(outside[p.name])
            continue
        shutil.copy(p, root / "blobs" / f"sha{i}")
        (snap / p.name).symlink_to(f"../../blobs/sha{i}")
    return snap / "model.onnx"


def test_hf_cache_genai_folder_is_copied_with_its_real_bytes(tmp_path):
    adapter = _adapter(tmp_path)
    src = _genai_folder(tmp_path / "g", tokenizer=b'{"tok": "real"}')
    base = _hf_cache(tmp_path / "hub", src)
    out, want = tmp_path / "out", tmp_path / "want"
    res = _inject(base, adapter, out)
    assert res.exit_code == 0, res.output
    assert _inject(src, adapter, want).exit_code == 0
    got = _files(out)
    assert got == _files(want)
    assert got["tokenizer.json"] == b'{"tok": "real"}' and got["special_tokens_map.json"] == b"{}"
    assert not any(p.is_symlink() for p in out.iterdir())


def test_hf_cache_base_data_is_not_copied_as_a_side_file(tmp_path):
    """Optimum's ``model.onnx_data`` is a link to a blob there: known as the base's data by its real path."""
    src = _genai_folder(tmp_path / "g", data="model.onnx_data")
    out = tmp_path / "out"
    res = _inject(_hf_cache(tmp_path / "hub", src), _adapter(tmp_path), out)
    assert res.exit_code == 0, res.output
    # the model's data is named for its content (model.onnx.<hash>.data); exactly one, and no copy of the blob
    names = sorted(os.listdir(out))
    data = [n for n in names if re.fullmatch(r"model\.onnx\.[0-9a-f]{16}\.data", n)]
    assert len(data) == 1, names
    assert sorted(set(names) - set(data)) == sorted(
        [".lora-export.json", "ad.onnx_adapter", "ad.safetensors", "genai_config.json", "model.onnx",
         "special_tokens_map.json", "tokenizer.json"]
    )  # fmt: skip


@pytest.mark.parametrize("name", ["tokenizer.json", "genai_config.json"])
@pytest.mark.parametrize("how", ["absolute", "relative", "hf_cache"])
def test_a_side_file_linked_outside_the_model_folders_is_refused(tmp_path, name, how):
    adapter = _adapter(tmp_path)
    src = _genai_folder(tmp_path / "g")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}, "secret": "s3cr3t-" * 8}))
    if how == "hf_cache":
        base = _hf_cache(tmp_path / "hub", src, {name: Path("..", "..", "..", "secret.json")})
    else:
        (src.parent / name).unlink()
        (src.parent / name).symlink_to(secret if how == "absolute" else Path("..", "secret.json"))
        base = src
    out = tmp_path / "out"
    res = _inject(base, adapter, out)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "link outside the model's folder" in lines[0], res.output
    assert "s3cr3t" not in res.output and not out.exists()


def test_a_broken_tokenizer_link_is_refused(tmp_path):
    src = _genai_folder(tmp_path / "g")
    (src.parent / "tokenizer.json").unlink()
    (src.parent / "tokenizer.json").symlink_to("gone.json")
    res = _inject(src, _adapter(tmp_path), tmp_path / "out")
    assert res.exit_code == 2 and "broken link" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_folder_of_outdir_named_like_a_side_file_is_refused_not_replaced(tmp_path):
    adapter = _adapter(tmp_path)
    out = tmp_path / "out"
    (out / "tokenizer.json").mkdir(parents=True)
    (out / "tokenizer.json" / "mine.txt").write_text("the user's")
    res = _inject(_genai_folder(tmp_path / "g"), adapter, out)
    assert res.exit_code == 2 and "a folder of that name is in the way" in res.output, res.output
    assert (out / "tokenizer.json" / "mine.txt").read_text() == "the user's"
    assert sorted(os.listdir(out)) == ["tokenizer.json"]


@pytest.mark.parametrize("inside", [True, False])
def test_genai_dims_are_read_only_from_a_config_the_rule_allows(tmp_path, inside):
    """The widths that prove packed q/k/v slices come from genai_config.json only under the rule."""
    from lora_export.graph.targets.genai_names import GenaiDims, read_genai_config

    decoder = {"filename": "model.onnx", "num_attention_heads": 4, "num_key_value_heads": 2, "head_size": 8}
    src = _genai_folder(tmp_path / "g", extra={"model": {"decoder": decoder}})
    if inside:
        base = _hf_cache(tmp_path / "hub", src)
    else:
        shutil.move(src.parent / "genai_config.json", tmp_path / "elsewhere.json")
        (src.parent / "genai_config.json").symlink_to(tmp_path / "elsewhere.json")
        base = src
    assert read_genai_config(base) == (GenaiDims(32, 16) if inside else None)

"""The patched copy behind merge's and inject's fast save: the output holds the base's bytes with the
patches in place, and the sha256 it returns (the data file's content name) is that of the bytes written,
for patches inside one read chunk, across chunk boundaries, at the file's ends and with no patch."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import pytest

from lora_export.graph.model import patch_save


@pytest.mark.parametrize(
    "spans",
    [[], [(0, 8)], [(5, 40), (60, 64)], [(30, 70)], [(100, 137)], [(0, 137)], [(3, 4), (16, 48), (130, 137)]],
)
def test_copy_patched_writes_and_hashes_the_patched_bytes(tmp_path, monkeypatch, spans):
    monkeypatch.setattr(patch_save, "_CHUNK", 32)  # many chunks, so patches straddle their boundaries
    rng = np.random.default_rng(len(spans))
    base = rng.integers(0, 256, 137, dtype=np.uint8).tobytes()
    src = tmp_path / "base.data"
    src.write_bytes(base)
    patches, expected = [], bytearray(base)
    for lo, hi in spans:
        new = rng.integers(0, 256, hi - lo, dtype=np.uint8)
        patches.append((lo, ir.tensor(new)))
        expected[lo:hi] = new.tobytes()
    out = tmp_path / "out.data"
    digest = patch_save.copy_patched(src, out, patches)
    assert out.read_bytes() == bytes(expected)
    assert digest == hashlib.sha256(expected).hexdigest()
    assert src.read_bytes() == base  # the input is only read


def test_copy_falls_back_where_copy_file_range_cannot(tmp_path, monkeypatch):
    def refuse(*_args):
        raise OSError(18, "Invalid cross-device link")  # EXDEV: another filesystem

    monkeypatch.setattr(patch_save.os, "copy_file_range", refuse)
    src = tmp_path / "base.data"
    src.write_bytes(bytes(range(256)) * 3)
    out = tmp_path / "out.data"
    digest = patch_save.copy_patched(src, out, [(10, ir.tensor(np.full(4, 7, np.uint8)))])
    want = bytearray(bytes(range(256)) * 3)
    want[10:14] = b"\x07" * 4
    assert out.read_bytes() == bytes(want) and digest == hashlib.sha256(want).hexdigest()

"""The patched copy behind merge's and inject's fast save: the output holds the base's bytes with the
patches in place, and the digest it returns (the data file's content name) is XXH3-128 of the bytes
written, for patches at the file's ends, adjacent, covering it all, and with no patch."""

from __future__ import annotations

import mmap

import numpy as np
import onnx_ir as ir
import pytest
import xxhash

from lora_export.graph.model import patch_save


@pytest.mark.parametrize(
    "spans",
    [
        [],
        [(0, 8)],
        [(5, 40), (60, 64)],
        [(30, 70)],
        [(100, 137)],
        [(0, 137)],
        [(3, 4), (16, 48), (130, 137)],
        [(3, 4), (4, 9)],
    ],
)
def test_copy_patched_writes_and_hashes_the_patched_bytes(tmp_path, spans):
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
    assert digest == xxhash.xxh3_128(bytes(expected)).hexdigest()
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
    assert out.read_bytes() == bytes(want) and digest == xxhash.xxh3_128(bytes(want)).hexdigest()


def test_an_empty_data_file_has_the_digest_of_no_bytes(tmp_path):
    src = tmp_path / "empty.data"
    src.write_bytes(b"")
    assert patch_save.copy_patched(src, tmp_path / "out.data", []) == xxhash.xxh3_128(b"").hexdigest()
    assert (tmp_path / "out.data").read_bytes() == b""


def test_the_digest_is_that_of_the_patched_bytes_across_mapping_windows(tmp_path, monkeypatch):
    from lora_export.graph.model import data_file

    step = mmap.ALLOCATIONGRANULARITY
    monkeypatch.setattr(data_file, "_WINDOW", step)  # many windows, so ranges and patches straddle them
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, 5 * step + 123, dtype=np.uint8).tobytes()
    src = tmp_path / "base.data"
    src.write_bytes(base)
    patches = [(step - 3, b"a" * 9), (2 * step + 1, b"b" * (step + 5)), (5 * step + 120, b"c" * 3)]
    want = bytearray(base)
    for offset, data in patches:
        want[offset : offset + len(data)] = data
    assert data_file.content_digest(src, patches) == xxhash.xxh3_128(bytes(want)).hexdigest()
    assert data_file.content_digest(src) == xxhash.xxh3_128(base).hexdigest()

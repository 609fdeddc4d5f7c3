"""Reading base weights one by one (the fingerprints inject writes) holds one weight's memory-mapped pages at a
time: ``drop_mapped_pages`` unmaps a read weight's pages from the process, and a later read gives the same bytes."""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import pytest

from lora_export.graph.model.external_data import drop_mapped_pages


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is read from Linux's /proc")
def test_a_read_weights_pages_leave_the_process_and_its_bytes_stay(tmp_path):
    rng = np.random.default_rng(3)
    head = rng.standard_normal(1000).astype(np.float32)
    weight = rng.standard_normal((2048, 2048)).astype(np.float32)  # 16 MiB
    data = tmp_path / "w.data"
    data.write_bytes(head.tobytes() + weight.tobytes())
    tensor = ir.ExternalTensor(
        "w.data",
        head.nbytes,
        weight.nbytes,
        ir.DataType.FLOAT,
        shape=ir.Shape(weight.shape),
        name="w",
        base_dir=tmp_path,
    )
    value = ir.Value(name="w", const_value=tensor)
    before = _rss_file_kb()
    np.testing.assert_array_equal(tensor.numpy(), weight)  # maps the pages in
    mapped = _rss_file_kb() - before
    assert mapped > 12 * 1024
    drop_mapped_pages(value)
    assert _rss_file_kb() - before < mapped / 4
    np.testing.assert_array_equal(tensor.numpy(), weight)  # the same bytes, faulted back in
    drop_mapped_pages(ir.Value(name="inline", const_value=ir.tensor(head)))  # not mapped: nothing to do
    drop_mapped_pages(None)

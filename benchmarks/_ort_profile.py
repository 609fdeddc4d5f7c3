"""ONNX Runtime profiler traces read per run: the sum of node kernel times of each ``Run``, in call order.

A trace holds one JSON event per line; a run's node events come before its ``model_run`` event. Reading it
line by line keeps memory flat for traces of hundreds of MB (a decode step of a 12-layer model writes ~1 MB).
"""

from __future__ import annotations

import os
import re

import onnxruntime as ort

_DUR = re.compile(r'"dur" :(\d+)')


def enable(so: ort.SessionOptions, prefix: str) -> ort.SessionOptions:
    """Turn ONNX Runtime's profiler on in ``so`` (trace file name starts with ``prefix``); returns ``so``."""
    so.enable_profiling, so.profile_file_prefix = True, prefix
    return so


def kernel_us_per_run(trace: str, remove: bool = True) -> list[tuple[float, int]]:
    """(sum of node kernel µs, node count) for every ``model_run`` in ``trace``, in the order they ran."""
    runs: list[tuple[float, int]] = []
    total, nodes = 0.0, 0
    with open(trace) as fh:
        for line in fh:
            if '"cat" : "Node"' in line and "_kernel_time" in line:
                total += int(_DUR.search(line).group(1))
                nodes += 1
            elif '"name" :"model_run"' in line:
                runs.append((total, nodes))
                total, nodes = 0.0, 0
    if remove:
        os.remove(trace)
    return runs

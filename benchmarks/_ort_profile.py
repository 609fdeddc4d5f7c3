"""ONNX Runtime profiler traces read per run: the sum of node kernel times of each ``Run``, in call order.

A trace holds one JSON event per line; a run's node events come before its ``model_run`` event. Reading it
line by line keeps memory flat for traces of hundreds of MB (a decode step of a 12-layer model writes ~1 MB).
"""

from __future__ import annotations

import collections
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


class Traced:
    """A ``LoraSession`` whose every ``run`` is labelled (first argument), so that its profiled runs can be
    told apart afterwards; labels are ``(route, rep)`` or None (not counted)."""

    def __init__(self, session, profiled: bool) -> None:
        self.session, self.profiled, self.labels = session, profiled, []

    def run(self, label, *args, **kw):
        self.labels.append(label)
        return self.session.run(*args, **kw)

    def kernel_ms(self) -> tuple[dict, dict]:
        """({label: kernel ms summed over its runs}, {label: node events per run}); ends profiling."""
        if not self.profiled:
            return {}, {}
        runs = kernel_us_per_run(self.session.session.end_profiling())
        if len(runs) != len(self.labels):
            raise RuntimeError(f"profile has {len(runs)} runs, {len(self.labels)} were made")
        ms: dict = collections.defaultdict(float)
        nodes: dict = collections.defaultdict(set)
        for label, (us, n) in zip(self.labels, runs):
            if label is not None:
                ms[label] += us / 1000
                nodes[label[0]].add(n)
        return ms, {k: sorted(v) for k, v in nodes.items()}

"""Keeping torch and the ONNX tools quiet while exporting: their warnings, log lines and progress are not
actionable for our users, and a failure is reported in one line anyway."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

_QUIET_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx", "transformers")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings and no log lines from torch, the ONNX tools or transformers while exporting: their
    messages are not actionable for our users, and a failure is reported in one line anyway."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in _QUIET_LOGGERS]
    loggers = [logging.getLogger(n) for n in {*names, *_QUIET_LOGGERS}]
    levels = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in levels:
            lg.setLevel(level)


@contextlib.contextmanager
def native_stdout_silenced() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null for the block (what C++ writes with std::cout), then restore it."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (captured by a test runner): nothing to do
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)

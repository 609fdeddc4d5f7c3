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
    # Descriptor 1 itself, not sys.stdout's: that may be redirected (``stdout_to_stderr``) or a test
    # runner's buffer, while C++ writes to 1 whatever Python does.
    fd = 1
    try:
        os.fstat(fd)
    except OSError:  # no descriptor 1: nothing to silence
        yield
        return
    with contextlib.suppress(AttributeError, OSError, ValueError):
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


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what user code prints (Python's ``print`` and native writes to descriptor 1) to stderr for
    the block: a factory's or a model's chatter must not mix into ``--json`` output on stdout."""
    fd, err = 1, 2
    try:
        os.fstat(fd), os.fstat(err)
    except OSError:  # no descriptors to point: Python level only
        fd = None
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stdout.flush()
    saved = os.dup(fd) if fd is not None else None
    try:
        if saved is not None:
            os.dup2(err, fd)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)

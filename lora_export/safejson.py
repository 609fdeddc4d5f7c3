"""JSON from untrusted files and metadata, parsed with every failure reported as a JSONDecodeError.

``json.loads`` raises RecursionError for deeply nested input and a plain ValueError for integers with
too many digits; callers that catch ``json.JSONDecodeError`` (a ValueError) get those as one too.
Whether a nested document parses does not depend on how deep in the call stack the parse runs:
documents nested up to ``MAX_DEPTH`` levels always parse (and ``dumps`` writes them back); deeper ones
are refused as "nested too deeply".
"""

from __future__ import annotations

import contextlib
import json
import reprlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

MAX_DEPTH = 1000
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 40
_REPR.maxother = 40
_LIMIT_LOCK = threading.RLock()


@contextlib.contextmanager
def _headroom() -> Iterator[None]:
    # The json module recurses once per level: room for MAX_DEPTH more levels than the caller's stack
    # holds. A lock, so that concurrent parses cannot leave the process limit raised.
    with _LIMIT_LOCK:
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(old + MAX_DEPTH + 64)
        try:
            yield
        finally:
            sys.setrecursionlimit(old)


def loads(text: str | bytes | bytearray) -> Any:
    """``json.loads`` that raises only ``json.JSONDecodeError`` (nesting too deep, numbers too long)."""
    try:
        with _headroom():
            return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", _as_str(text), 0) from None
    except (ValueError, TypeError) as e:
        raise json.JSONDecodeError(str(e).split("\n", 1)[0], _as_str(text), 0) from None


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` with the same room for nesting as ``loads``: what ``loads`` read, it writes back.
    ValueError (not RecursionError) for a value nested deeper than that."""
    try:
        with _headroom():
            return json.dumps(value, **kwargs)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def short_repr(value: Any) -> str:
    """A bounded repr for error messages: safe for deeply nested or huge parsed JSON values."""
    try:
        return _REPR.repr(value)
    except (RecursionError, ValueError):
        return type(value).__name__


def _as_str(text: str | bytes | bytearray) -> str:
    # JSONDecodeError computes line/column from the document; a prefix is enough for position 0.
    return text[:64] if isinstance(text, str) else bytes(text[:64]).decode("utf-8", "replace")

"""JSON from untrusted files and metadata, parsed with every failure reported as a JSONDecodeError.

``json.loads`` raises RecursionError for deeply nested input and a plain ValueError for integers with
too many digits; callers that catch ``json.JSONDecodeError`` (a ValueError) get those as one too.
"""

from __future__ import annotations

import json
import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 40
_REPR.maxother = 40


def loads(text: str | bytes | bytearray) -> Any:
    """``json.loads`` that raises only ``json.JSONDecodeError`` (nesting too deep, numbers too long)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", _as_str(text), 0) from None
    except (ValueError, TypeError) as e:
        raise json.JSONDecodeError(str(e).split("\n", 1)[0], _as_str(text), 0) from None


def short_repr(value: Any) -> str:
    """A bounded repr for error messages: safe for deeply nested or huge parsed JSON values."""
    try:
        return _REPR.repr(value)
    except (RecursionError, ValueError):
        return type(value).__name__


def _as_str(text: str | bytes | bytearray) -> str:
    # JSONDecodeError computes line/column from the document; a prefix is enough for position 0.
    return text[:64] if isinstance(text, str) else bytes(text[:64]).decode("utf-8", "replace")

"""Regular expressions from adapter configs, matched in linear time (RE2) with PEFT's semantics.

adapter_config.json comes from anywhere: a pattern such as ``(a+)+$`` would make Python's backtracking
``re`` run for hours on a long module path. RE2 guarantees time linear in the input and refuses the
features that need backtracking (backreferences, lookaround): those patterns are refused with one line.

PEFT's rules: a string ``target_modules`` / ``exclude_modules`` is ``re.fullmatch`` over the module
path; a ``rank_pattern`` / ``alpha_pattern`` key matches when ``re.match(rf"(.*\\.)?({key})$", path)``.
RE2 differs from ``re`` only in corners module paths never reach (``\\d``/``\\w`` are ASCII-only).
"""

from __future__ import annotations

import functools
import re

import re2

from ..errors import ConfigError

_OPTIONS = re2.Options()
# RE2 logs every refused pattern to stderr itself; the ConfigError says it in one line instead.
_OPTIONS.log_errors = False


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str):
    return re2.compile(pattern, _OPTIONS)


def check_pattern(pattern: str, what: str, *, suffix: bool = False) -> None:
    """Check that ``pattern`` is a regular expression RE2 can run; one-line ConfigError otherwise.

    ``suffix``: the pattern is a rank/alpha pattern key, used inside PEFT's suffix template.
    """
    if not isinstance(pattern, str):
        raise ConfigError(f"{what} must be a string, got {type(pattern).__name__}")
    text = _suffix_form(pattern) if suffix else pattern
    try:
        _compiled(text)
        return
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
    except (TypeError, ValueError, UnicodeError) as e:
        reason = str(e)
    try:
        re.compile(text)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        raise ConfigError(f"{what} is not a valid regular expression ({e}): {pattern!r}") from None
    raise ConfigError(
        f"{what} uses a regex feature without a linear-time matcher (backreference, lookaround, ...; {reason}): "
        f"{pattern!r}"
    )


def full_match(pattern: str, name: str) -> bool:
    """PEFT's ``re.fullmatch(pattern, name)``, in linear time."""
    return _compiled(pattern).fullmatch(_text(name)) is not None


def suffix_match(key: str, name: str) -> bool:
    """PEFT's pattern-key rule ``re.match(rf"(.*\\.)?({key})$", name)``, in linear time."""
    p = _compiled(_suffix_form(key))
    text = _text(name)
    # Python's "$" also matches before one final newline; RE2's only at the end.
    return p.match(text) is not None or (text.endswith("\n") and p.match(text[:-1]) is not None)


def _suffix_form(key: str) -> str:
    # The same text as PEFT's, so a key with "|" or unbalanced groups parses exactly as it does there.
    return rf"(.*\.)?({key})$"


def _text(name: str) -> str:
    # RE2 matches UTF-8: a lone surrogate (from undecodable bytes) cannot be encoded; escape it instead.
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def search(pattern: str, name: str, what: str = "pattern") -> bool:
    """Whether ``pattern`` occurs anywhere in ``name`` (``re.search``), in linear time; a pattern RE2
    cannot run is a one-line ConfigError naming ``what``."""
    check_pattern(pattern, what)
    return _compiled(pattern).search(_text(name)) is not None

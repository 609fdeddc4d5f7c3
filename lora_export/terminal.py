"""Text for the terminal: names from files (paths, tensor and node names) escaped so they cannot move
the cursor, recolour, erase or split the output, and always encodable."""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(m: re.Match) -> str:
    c = m.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
        f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    )


def clean(text: object) -> str:
    """``text`` as one printable line: control characters escaped, undecodable bytes (lone surrogates)
    shown as ``\\udcXX``."""
    s = str(text)
    s = _CONTROL.sub(_escape, s)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def clean_lines(text: str) -> str:
    """Multi-line output: each line cleaned, the line breaks kept."""
    return "\n".join(clean(line) for line in text.split("\n"))


def aligned(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    """Rows of cells as lines with their columns aligned (each cell cleaned first; trailing spaces cut)."""
    rows = [tuple(clean(c) for c in row) for row in rows]
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths))).rstrip() for row in rows]

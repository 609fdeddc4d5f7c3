"""Which adapters a server can load: the adapter files in the inject output and an optional second folder.

Rescanned on demand, so a file dropped into a folder becomes servable without a restart. A name is only ever
looked up in the scan's result, never joined onto a path: a request cannot name a file the folders do not hold.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

SUFFIXES = (".onnx_adapter", ".safetensors")
PEFT_CONFIG = "adapter_config.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def scan(folders: list[Path]) -> dict[str, Path]:
    """Adapter name -> source, over ``folders`` in order (an earlier folder wins a name).

    Sources: ``NAME.onnx_adapter`` / ``NAME.safetensors`` regular files, and PEFT folders ``NAME/`` holding
    ``adapter_config.json``. Hidden entries (our staging files among them) and odd names are skipped.
    """
    found: dict[str, Path] = {}
    for folder in folders:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_file() and path.suffix in SUFFIXES:
                name = path.name[: -len(path.suffix)]
            elif entry.is_dir() and (path / PEFT_CONFIG).is_file():
                name = path.name
            else:
                continue
            if _NAME.fullmatch(name) and name not in found:
                found[name] = path
    return found


class Catalog:
    """A cached ``scan`` of the folders, refreshed at most every ``ttl`` seconds, or when a name is missing."""

    def __init__(self, folders: list[Path], ttl: float = 1.0) -> None:
        self.folders = [Path(f) for f in folders]
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._found: dict[str, Path] = {}

    def names(self) -> list[str]:
        """The adapters available now."""
        return sorted(self._current(force=False))

    def source(self, name: str) -> Path | None:
        """Where ``name`` is read from; a miss rescans once, so a file just dropped in is found."""
        found = self._current(force=False).get(name)
        return found if found is not None else self._current(force=True).get(name)

    def _current(self, force: bool) -> dict[str, Path]:
        with self._lock:
            now = time.monotonic()
            if force or now - self._at > self.ttl:
                self._found, self._at = scan(self.folders), now
            return self._found

"""Serving an injected export folder (``inject`` on a folder of several ONNX files, e.g. Optimum's
encoder + decoder): one ``LoraSession`` per model file, and adapters loaded by name from the per-file
tensors ``<adapter>.<file stem>.onnx_adapter``. A file an adapter has no tensors for runs its base weights
for that adapter, which is exact: the adapter targets nothing there."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import AdapterError, ModelError
from .session import LoraSession


class LoraFolderSession:
    """``LoraSession``s over every ``.onnx`` file of an injected folder; ``run(file, ...)`` runs one of them
    with the named adapter active where that adapter has tensors."""

    def __init__(self, folder: str | os.PathLike, *, providers: Sequence[str] | None = None) -> None:
        from ..graph.verbs.model_folder import model_files

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ModelError(f"{folder} is not a folder of ONNX files")
        self.sessions: dict[str, LoraSession] = {
            f: LoraSession(self.folder / f, providers=providers) for f in model_files(self.folder)
        }
        self._loaded: dict[str, set[str]] = {}  # adapter → files it has tensors for

    @property
    def files(self) -> list[str]:
        return list(self.sessions)

    @property
    def adapters(self) -> list[str]:
        return sorted(self._loaded)

    def session(self, file: str) -> LoraSession:
        """The session of one model file (``encoder_model.onnx``; the stem is accepted too)."""
        key = file if file in self.sessions else f"{file}.onnx"
        if key not in self.sessions:
            raise ModelError(f"no model file {file!r} in {self.folder} (files: {', '.join(self.sessions)})")
        return self.sessions[key]

    def load_adapter(self, name: str, folder: str | os.PathLike | None = None) -> None:
        """Load ``<name>.<file stem>.onnx_adapter`` from ``folder`` (default: the served folder) into each
        file's session; at least one file must have tensors for it."""
        from ..graph.verbs.model_folder import adapter_file_name

        if name in self._loaded:
            raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
        where = Path(folder) if folder is not None else self.folder
        files = {f for f, s in self.sessions.items() if s.slots and (where / adapter_file_name(name, f)).is_file()}
        if not files:
            raise AdapterError(f"no {adapter_file_name(name, '<file>')} for any model file in {where}")
        done = []
        try:
            for f in sorted(files):
                self.sessions[f].load_adapter(name, where / adapter_file_name(name, f))
                done.append(f)
        except BaseException:
            for f in done:
                self.sessions[f].unload_adapter(name)
            raise
        self._loaded[name] = files

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter in every file."""
        files = self._loaded.pop(name, None)
        if files is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        for f in files:
            self.sessions[f].unload_adapter(name)

    def run(
        self,
        file: str,
        output_names: Sequence[str] | None,
        feeds: Mapping[str, np.ndarray],
        adapter: str | None = None,
    ) -> list[np.ndarray]:
        """Run one model file with ``adapter`` (None: the base) active where it has tensors."""
        session = self.session(file)
        if adapter is not None and adapter not in self._loaded:
            raise AdapterError(f"no adapter named {adapter!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        key = next(f for f, s in self.sessions.items() if s is session)
        active = adapter if adapter is not None and key in self._loaded[adapter] else None
        return session.run(output_names, feeds, adapter=active)

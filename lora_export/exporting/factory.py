"""The ``FACTORY`` argument of ``lora-export export``: ``module:function`` or ``path/to/file.py:function``."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from ..errors import LoraExportError, first_line


def split_spec(spec: str) -> tuple[str, str]:
    """``module:function`` / ``file.py:function`` → (source, function); the last colon separates them."""
    source, sep, func_name = spec.rpartition(":")
    if not sep or not source or not func_name:
        raise LoraExportError(f"expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    return source, func_name


def is_file_spec(source: str) -> bool:
    return source.endswith(".py") or "/" in source or os.sep in source


def import_source(source: str) -> ModuleType:
    """Import a module by name (from the current directory first) or a Python file by path."""
    if is_file_spec(source):
        return _import_file(Path(source))
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(source)
    except SystemExit as e:
        raise LoraExportError(f"cannot import {source!r}: {_exited(e)}") from None
    except Exception as e:  # noqa: BLE001 - user code raises anything while importing
        raise LoraExportError(f"cannot import {source!r}: {type(e).__name__}: {first_line(e)}") from None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise LoraExportError(f"cannot import {str(path)!r}: no such file")
    resolved = path.resolve()
    # A unique module name per file: two factories both called model.py do not collide, nor shadow a package.
    name = "_lora_export_factory_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise LoraExportError(f"cannot import {str(path)!r}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)  # sibling imports of the factory file
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:
        sys.modules.pop(name, None)
        raise LoraExportError(f"cannot import {str(path)!r}: {_exited(e)}") from None
    except Exception as e:  # noqa: BLE001 - user code raises anything while importing
        sys.modules.pop(name, None)
        raise LoraExportError(f"cannot import {str(path)!r}: {type(e).__name__}: {first_line(e)}") from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _exited(e: SystemExit) -> str:
    # Even sys.exit(0) is a failure here: nothing was exported, and exit 0 would tell CI it was.
    return f"called sys.exit({e.code!r}) instead of returning, so nothing was exported"


def load_factory_module(spec: str) -> tuple[tuple[nn.Module, Any, dict], ModuleType]:
    """Call the factory → ((model, inputs, export kwargs), the module it came from)."""
    source, func_name = split_spec(spec)
    mod = import_source(source)
    func: Any = mod
    for part in func_name.split("."):
        func = getattr(func, part, None)
        if func is None:
            raise LoraExportError(f"{source!r} has no attribute {func_name!r}")
    if not callable(func):
        raise LoraExportError(f"{spec} is not callable")
    try:
        result = func()
    except SystemExit as e:
        raise LoraExportError(f"{spec}() {_exited(e)}; it must return (model, example_inputs)") from None
    except Exception as e:  # noqa: BLE001
        raise LoraExportError(f"{spec}() failed: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise LoraExportError(f"{spec}() must return (model, example_inputs) or (model, example_inputs, kwargs)")
    model, inputs = result[0], result[1]
    extra = result[2] if len(result) == 3 else None
    if extra is not None and not isinstance(extra, dict):
        raise LoraExportError(f"{spec}() returned export kwargs that are not a dict ({type(extra).__name__})")
    return (model, inputs, dict(extra or {})), mod


def load_factory(spec: str) -> tuple[nn.Module, Any, dict]:
    """Call ``module:function`` (importable from the current directory) or ``file.py:function``
    → (model, inputs, export kwargs)."""
    return load_factory_module(spec)[0]

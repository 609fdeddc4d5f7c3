"""Defer sympy's import (0.25-0.8 s, a third of the CLI's start-up) until something uses it.

onnx-ir imports sympy at start-up for symbolic dimension arithmetic (``SymbolicDim`` expressions),
which no command of ours evaluates; of onnx-ir, only its ``_symbolic_shapes`` module touches sympy at
import time. Both names get a stand-in module that imports the real one on its first attribute
access and forwards to it, so a graph that does need sympy still gets it, only later.
(``importlib.util.LazyLoader`` does not help: a later ``import sympy`` reads ``__spec__`` and so
loads it at once.) Applied by the CLI only, before anything imports onnx-ir; a library user's
process is left as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


class _Deferred(types.ModuleType):
    """Stands in for a module until an attribute it lacks is read; then imports the real one."""

    def __getattr__(self, attr: str):
        real = sys.modules.get(self.__name__)
        if real is self or real is None:
            del sys.modules[self.__name__]
            try:
                real = importlib.import_module(self.__name__)
            except BaseException:
                sys.modules.setdefault(self.__name__, self)
                raise
        # Later reads through this object (onnx-ir holds it as its global) find the real attributes.
        for key, value in vars(real).items():
            if key not in ("__name__", "__spec__", "__loader__", "__file__"):
                self.__dict__.setdefault(key, value)
        return getattr(real, attr)


def _stand_in(name: str, spec) -> None:
    module = _Deferred(name)
    module.__spec__ = spec
    module.__loader__ = spec.loader
    # Read by tools that walk sys.modules (inspect.getmodule): no reason to load the module. Not
    # __path__: importing a submodule must load the real package first.
    module.__file__ = spec.origin
    sys.modules[name] = module


def defer_sympy() -> None:
    """Give sympy and ``onnx_ir._symbolic_shapes`` stand-ins (no-op where either is imported)."""
    if any(m in sys.modules for m in ("sympy", "onnx_ir", "onnx_ir._symbolic_shapes")):
        return
    try:
        sympy = importlib.util.find_spec("sympy")
        onnx_ir = importlib.util.find_spec("onnx_ir")  # a top-level name: found without importing it
        if sympy is None or onnx_ir is None or not onnx_ir.submodule_search_locations:
            return
        folder = next(iter(onnx_ir.submodule_search_locations))
        shapes = importlib.util.spec_from_file_location("onnx_ir._symbolic_shapes", f"{folder}/_symbolic_shapes.py")
        if shapes is None:
            return
    except (ImportError, ValueError, OSError):
        return  # an unusual install: imports as usual, only slower
    _stand_in("sympy", sympy)
    _stand_in("onnx_ir._symbolic_shapes", shapes)

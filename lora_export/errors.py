"""Error types. Every failure a user can cause is a LoraExportError with a one-line message;
the CLI prints it without a traceback and exits non-zero."""

from __future__ import annotations


class LoraExportError(Exception):
    """Base class: a bad input or a request that cannot be met. Message is one line."""

    exit_code = 2


class ConfigError(LoraExportError):
    """An invalid LoRA configuration or adapter_config.json."""


class AdapterError(LoraExportError):
    """An adapter file or directory that is missing, unreadable, unsafe or inconsistent."""


class ShapeError(LoraExportError):
    """Adapter tensors that do not fit the model they are applied to."""


class DtypeError(ShapeError):
    """Feeds or adapter tensors whose element type is not the one the model expects (never cast silently)."""


class TargetError(LoraExportError):
    """Target modules or weights that cannot be found or matched."""


class ModelError(LoraExportError):
    """An ONNX model that is missing, corrupt or unsupported."""


class VerificationError(LoraExportError):
    """Two models disagree beyond the tolerance (exit code 1: a finding, not a usage error)."""

    exit_code = 1


def one_line(e: BaseException) -> str:
    """An exception's whole message on one line (lines joined, whitespace collapsed, ANSI colours stripped)."""
    import re

    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())
    return text or type(e).__name__


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (ANSI colours stripped), for one-line errors; a line
    longer than ``limit`` is summarized (``summarize``), never cut mid-word."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return summarize(text.splitlines()[0], limit) if text else type(e).__name__


def summarize(text: str, limit: int = 300) -> str:
    """``text`` when it fits ``limit`` characters; else its words up to about ``limit`` characters and
    ``... (N more words)``. Words are never cut: one word longer than ``limit`` is kept whole."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit + 1)
    if cut <= 0:  # no space before the limit: keep the first word whole
        cut = text.find(" ", limit)
        if cut < 0:
            return text
    head, rest = text[:cut].rstrip(), text[cut:].split()
    return f"{head} ... ({len(rest)} more word{'s' if len(rest) != 1 else ''})" if rest else head


def some(names, limit: int = 3) -> str:
    """Names for a one-line message: the first ``limit``, then how many more (never dropped silently)."""
    names = [str(n) for n in names]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


TRAIN_EXTRA = "pip install 'lora-export[train]'"


class MissingExtraError(LoraExportError, ImportError):
    """PyTorch (or onnxscript) is not installed: training and export are the ``lora-export[train]`` extra.
    Merging, injecting, converting, inspecting, verifying and serving never import them."""


def require_torch(what: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` (one line) unless torch and ``modules`` import; ``what`` needs them."""
    import importlib

    for module in ("torch", *modules):
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtraError(f"{what} needs {module}, which is not installed: {TRAIN_EXTRA}") from None

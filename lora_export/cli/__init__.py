"""The ``lora-export`` command line: a click group; each command lives in its own module of this package.

Exit codes: 0 success; 1 a check failed (``verify`` beyond tolerance); 2 bad input or usage; 130
interrupted. Errors print exactly one line on stderr (``error: ...``), never a traceback; with ``--json``
they also print ``{"error": ..., "kind": ...}`` on stdout. Library warnings and log records are silenced
here, at the entry point, so they cannot add lines (``LORA_EXPORT_DEBUG=1`` shows them, and tracebacks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import click

from .._version import __version__

# numpy's OpenBLAS threads make the merge's low-rank products (B @ A, rank << width) up to 10x slower on
# a busy machine (measured on a 2-core VM: 28 ms vs 3 ms per 768x16x768 product) and gain nothing on an
# idle one. Only the CLI sets this, before numpy loads, and only where the user has not chosen.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from ..errors import LoraExportError, VerificationError, first_line
from ..terminal import clean
from ._lazy_sympy import defer_sympy

defer_sympy()

# Bare ``lora-export`` shows the help (click >= 8.2 signals it with this UsageError); older clicks lack it.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
_INTERNAL_HINT = "(please report; LORA_EXPORT_DEBUG=1 shows the traceback)"


def _debug() -> bool:
    return os.environ.get("LORA_EXPORT_DEBUG", "") not in ("", "0")


def _fail(ctx: click.Context, message: str, kind: str, code: int = 2) -> None:
    """Print one error line (and, with --json, the error object on stdout); exit with ``code``."""
    line = clean(message)
    click.echo(f"error: {line}", err=True)
    # verify's failed comparison has already printed its JSON report: stdout stays one JSON document.
    if ctx.meta.get("lora_export.json") and kind != VerificationError.__name__:
        click.echo(json.dumps({"error": line, "kind": kind}))
    ctx.exit(code)


def _usage_error(ctx: click.Context, e: click.UsageError) -> None:
    # click would print the usage and a hint too: bad input gets one line here, like every other error.
    if isinstance(e, _NO_ARGS_IS_HELP):
        raise e
    where = (e.ctx or ctx).command_path
    _fail(ctx, f"{e.format_message()} (see '{where} --help')", "UsageError", e.exit_code)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """No warnings and no log records from libraries (onnx-ir, numpy, torch) while a command runs:
    Python's last-resort log handler and ``warnings`` would each add lines to stderr."""
    if _debug():
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


class _Group(click.Group):
    # Commands load on first use: start-up imports click only, and each command module imports its
    # heavy dependencies (numpy, onnx, onnx-ir, onnxruntime, torch) inside the command (issue 16).
    def list_commands(self, ctx: click.Context) -> list[str]:
        from .commands import LAZY_COMMANDS, plugin_entry_points

        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS) | set(plugin_entry_points()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        from .commands import load_command

        return super().get_command(ctx, cmd_name) or load_command(cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Errors of the subcommand need to know about --json before the subcommand parses it.
        ctx.meta["lora_export.json"] = "--json" in (args[: args.index("--")] if "--" in args else args)
        try:
            if any("\x00" in a for a in args):
                # No path can hold one; os would raise a bare ValueError deep inside a command.
                raise click.UsageError("arguments cannot contain NUL bytes", ctx)
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            _usage_error(ctx, e)

    def invoke(self, ctx: click.Context):
        try:
            with _quiet_libraries():
                return super().invoke(ctx)
        except click.UsageError as e:
            _usage_error(ctx, e)
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except LoraExportError as e:
            _fail(ctx, str(e), type(e).__name__, e.exit_code)
        except OSError as e:
            _fail(ctx, f"{e.strerror or e}: {e.filename or ''}".rstrip(": "), type(e).__name__)
        except MemoryError:
            _fail(ctx, "out of memory", "MemoryError")
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", "KeyboardInterrupt", 130)
        except Exception as e:  # noqa: BLE001 - the safety net: a bug still gets one line, not a traceback
            if _debug():
                raise
            detail = f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__
            _fail(ctx, f"internal error: {detail} {_INTERNAL_HINT}", "InternalError")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora-export")
def cli() -> None:
    """Take LoRA adapters from PyTorch training to ONNX deployment."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="lora-export", standalone_mode=True)


if __name__ == "__main__":
    main(sys.argv[1:])

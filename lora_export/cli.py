"""The ``lora-export`` command line: a click group; each command lives in ``lora_export.commands``.

Exit codes: 0 success; 1 a check failed (``verify`` beyond tolerance); 2 bad input or usage.
Errors print one line on stderr (``error: ...``), never a traceback.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import LoraExportError

# Bare ``lora-export`` shows the help (click >= 8.2 signals it with this UsageError); older clicks lack it.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _usage_error(ctx: click.Context, e: click.UsageError) -> None:
    # click would print the usage and a hint too: bad input gets one line here, like every other error.
    if isinstance(e, _NO_ARGS_IS_HELP):
        raise e
    where = (e.ctx or ctx).command_path
    click.echo(f"error: {e.format_message()} (see '{where} --help')", err=True)
    ctx.exit(e.exit_code)


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            _usage_error(ctx, e)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            _usage_error(ctx, e)
        except LoraExportError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:
            click.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            ctx.exit(2)
        except MemoryError:
            click.echo("error: out of memory", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora-export")
def cli() -> None:
    """Take LoRA adapters from PyTorch training to ONNX deployment."""


def _register() -> None:
    from .commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="lora-export", standalone_mode=True)


if __name__ == "__main__":
    main(sys.argv[1:])

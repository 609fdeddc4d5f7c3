"""CLI commands, one module each; ``COMMANDS`` is what ``lora-export`` offers."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

from .export import export_command  # noqa: E402
from .inspect import inspect_command  # noqa: E402
from .verify import verify_command  # noqa: E402

COMMANDS += [export_command, inspect_command, verify_command]

from . import convert, inject, merge  # noqa: E402, F401  (each registers its command)

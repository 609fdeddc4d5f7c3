"""CLI commands, one module each; ``COMMANDS`` is what ``lora-export`` offers."""

from __future__ import annotations

import click

from .combine import combine_command
from .convert import convert_command
from .convert_init import convert_init_command
from .export import export_command
from .inject import inject_command
from .inspect import inspect_command
from .merge import merge_command
from .verify import verify_command

COMMANDS: list[click.Command] = [
    combine_command,
    convert_command,
    convert_init_command,
    export_command,
    inject_command,
    inspect_command,
    merge_command,
    verify_command,
]

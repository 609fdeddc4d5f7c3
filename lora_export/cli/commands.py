"""CLI commands, one module each; ``COMMANDS`` is what ``lora-export`` offers."""

from __future__ import annotations

import click

from .build import build_command
from .convert import convert_command
from .convert_init import convert_init_command
from .export import export_command
from .inject import inject_command
from .inspect import inspect_command
from .merge import merge_command
from .verify import verify_command

ENTRY_POINTS = "lora_export.commands"  # commands of plugins (lora-export serve), loaded with the CLI

COMMANDS: list[click.Command] = [
    build_command,
    convert_command,
    convert_init_command,
    export_command,
    inject_command,
    inspect_command,
    merge_command,
    verify_command,
]


def plugin_commands() -> list[click.Command]:
    """Commands that installed plugins add through the ``lora_export.commands`` entry point group."""
    from importlib.metadata import entry_points

    found = []
    for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name):
        command = ep.load()
        if isinstance(command, click.Command):
            found.append(command)
    return found

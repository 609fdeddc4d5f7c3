"""CLI commands, one module each, loaded on first use; ``LAZY_COMMANDS`` is what ``lora-export`` offers."""

from __future__ import annotations

import importlib

import click

# name -> (module of this package, command object): importing a command module costs only click.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("build", "build_command"),
    "combine": ("combine", "combine_command"),
    "convert": ("convert", "convert_command"),
    "convert-init": ("convert_init", "convert_init_command"),
    "export": ("export", "export_command"),
    "inject": ("inject", "inject_command"),
    "inspect": ("inspect", "inspect_command"),
    "merge": ("merge", "merge_command"),
    "verify": ("verify", "verify_command"),
}


def load_command(name: str) -> click.Command | None:
    """The command called ``name``, its module imported now; None for an unknown name."""
    entry = LAZY_COMMANDS.get(name)
    if entry is None:
        ep = plugin_entry_points().get(name)
        command = ep.load() if ep is not None else None
        return command if isinstance(command, click.Command) else None
    module, attr = entry
    return getattr(importlib.import_module(f".{module}", __package__), attr)


ENTRY_POINTS = "lora_export.commands"  # commands of installed plugins (lora-export serve)


def plugin_entry_points() -> dict:
    """Plugin commands by name (``lora_export.commands`` entry points); a core command's name cannot be taken."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS) if ep.name not in LAZY_COMMANDS}

"""CLI commands, one module each; ``COMMANDS`` is what ``lora-export`` offers."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []

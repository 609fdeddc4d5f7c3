"""Progress on stderr for long operations, on a terminal only: never with ``--json`` or when stderr is
not a TTY (pipes, CI logs and tests get no progress lines).

``progress_bar(label, as_json)`` gives a callback ``(done, total, name)`` (the library's ``progress=``
argument) or None; ``phase(label, as_json)`` shows "label ..." for a step that reports no counts
(an export, say) and clears the line when the step ends.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

from ..terminal import clean


def on_terminal(as_json: bool = False) -> bool:
    """Whether progress may be shown: stderr is a TTY and the output is not JSON."""
    if as_json:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class ProgressBar:
    """A click progress bar on stderr, created on the first callback (when the total is known)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar = None
        self._done = 0
        self._name = ""

    def __call__(self, done: int, total: int, name: str) -> None:
        self._name = clean(name)
        if self._bar is None:
            self._bar = click.progressbar(
                length=max(total, 1), label=self.label, file=sys.stderr, item_show_func=lambda _: self._name
            )
            self._bar.__enter__()
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@contextlib.contextmanager
def progress_bar(label: str, as_json: bool = False) -> Iterator[ProgressBar | None]:
    """A ``ProgressBar`` on a terminal (closed on exit, also on errors), else None."""
    bar = ProgressBar(label) if on_terminal(as_json) else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def phase(label: str, as_json: bool = False) -> Iterator[None]:
    """Show ``label ...`` on stderr while a step without counts runs (terminal only); erase it after."""
    shown = on_terminal(as_json)
    if shown:
        click.echo(f"{clean(label)} ...", file=sys.stderr, nl=False)
        sys.stderr.flush()
    try:
        yield
    finally:
        if shown:
            # Carriage return and erase-line: the phase leaves no line behind.
            click.echo("\r\x1b[K", file=sys.stderr, nl=False)
            sys.stderr.flush()

"""Output for people: rich on a terminal, plain on a pipe.

A pipe or a file gets no colour and no wrapping (a line wrapped at 80
columns splits `modelHash:` from its value, and greps miss it); a
terminal gets colour and its own width.
"""

from __future__ import annotations

import sys

# What a pipe's lines may run to before rich folds them (never, in practice).
PIPE_WIDTH = 1000


def console(*, stream=None):
    """A rich Console for `stream` (stdout by default)."""
    from rich.console import Console

    stream = stream or sys.stdout
    if stream.isatty():
        return Console(file=stream)
    return Console(file=stream, no_color=True, soft_wrap=True, width=PIPE_WIDTH, force_terminal=False)

"""Terminal output helpers for commands: progress bars (tqdm on stderr) and small formatting."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def tqdm_progress(iterable: Iterable, *, total: int | None = None, desc: str = ""):
    """A :class:`modelatlas.progress.Progress` that draws a tqdm bar on stderr (hidden when not a TTY
    unless ATLAS_PROGRESS=1)."""
    import os

    disable = not sys.stderr.isatty() and os.environ.get("ATLAS_PROGRESS", "") != "1"
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=disable)


def echo(*parts: object) -> None:
    """Print to stdout (commands' results)."""
    print(*parts)


def counted(n: int, noun: str) -> str:
    """'1 model', '3 models': a count with its noun in the right number (plural by adding 's')."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def warn(message: str) -> None:
    """Print a warning line to stderr."""
    print(f"warning: {message}", file=sys.stderr)

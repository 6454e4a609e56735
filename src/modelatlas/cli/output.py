"""Terminal output helpers for commands: progress bars (tqdm on stderr) and small formatting."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from modelatlas.atomic import SURROGATE_ESCAPES


def tqdm_progress(iterable: Iterable, *, total: int | None = None, desc: str = ""):
    """A :class:`modelatlas.progress.Progress` that draws a tqdm bar on stderr (hidden when not a TTY
    unless ATLAS_PROGRESS=1)."""
    import os

    disable = not sys.stderr.isatty() and os.environ.get("ATLAS_PROGRESS", "") != "1"
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=disable)


# C0 and C1 control characters but tab and newline, shown as \x1b: a model named with an escape sequence
# (clear the screen, recolour) or a carriage return (overwrite the line) reached the terminal raw; and lone
# surrogates, a file name's bytes that are not UTF-8 (\xe9), which ended a UTF-8 print in a UnicodeEncodeError
_CONTROL = {**{c: f"\\x{c:02x}" for c in [*range(0, 9), *range(11, 32), *range(127, 160)]}, **SURROGATE_ESCAPES}


def printable(text: object) -> str:
    """``text`` with its control characters (but tab and newline) and lone surrogates written as escapes, e.g.
    ``\\x1b``, and ``\\xe9`` for the byte of a file name that is not UTF-8."""
    return str(text).translate(_CONTROL)


def one_line(text: object) -> str:
    """:func:`printable`, newlines too written as ``\\n``: a message stays on its line when a model's name
    holds one (a file may be named so)."""
    return printable(text).replace("\n", "\\n")


def echo(*parts: object) -> None:
    """Print to stdout (commands' results), control characters escaped (:func:`printable`)."""
    print(*map(printable, parts))


def counted(n: int, noun: str) -> str:
    """'1 model', '3 models': a count with its noun in the right number (plural by adding 's')."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def note(message: str) -> None:
    """Print an informational line to stderr (what was skipped, matched, or how to go on), control
    characters escaped (:func:`printable`): model names reach it."""
    print(one_line(message), file=sys.stderr)


def warn(message: str) -> None:
    """Print a warning line to stderr."""
    print(f"warning: {one_line(message)}", file=sys.stderr)


@contextmanager
def warnings_as_lines(category: type[Warning]) -> Iterator[None]:
    """While inside, each warning of ``category`` the library issues (``warnings.warn``: it prints nothing) is
    shown as one :func:`warn` line, each time, not Python's 'file:line: Category: message' and source line,
    once per place; other warnings are shown as before. Restored on exit."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", category)
        shown = warnings.showwarning

        def show(message, kind, filename, lineno, file=None, line=None):
            if issubclass(kind, category):
                warn(str(message))
            else:
                shown(message, kind, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def say_fresh_start(resume: bool, out: str | Path, kept_in: str = "") -> None:
    """With --resume on a new or empty --out (a mistyped folder, or a run stopped before its first checkpoint
    left nothing), say that the run starts from the beginning, as `atlas attribute` does; it said nothing.
    ``kept_in``: the sub-folder the command keeps its state in (distill: ``checkpoint``); where it holds a
    checkpoint.json, say which iteration the run goes on from (a resume printed nothing until its last line)."""
    out = Path(out)
    if resume and (not out.is_dir() or not any(out.iterdir())):
        echo(f"nothing to resume in {out / kept_in}: starting from the beginning")
    elif resume and kept_in and (done := _iterations_done(out / kept_in / "checkpoint.json")) is not None:
        echo(f"resuming from {out / kept_in}: {counted(done, 'iteration')} done")


def _iterations_done(path: Path) -> int | None:
    """The ``iteration`` a checkpoint.json records; None when it cannot be read (the run itself says why)."""
    import json

    try:
        done = json.loads(path.read_text())["iteration"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return done if isinstance(done, int) and not isinstance(done, bool) else None

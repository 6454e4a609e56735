"""Named ``type=`` callables for argparse options.

argparse names a callable in its message (``invalid <lambda> value: '1,x'``), so each type here raises
:class:`argparse.ArgumentTypeError` with a message in argparse's own words that names what was expected:
``argument --top: invalid positive integer value: '0'``. Not a command module: ``main`` does not register it.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A count that must be at least 1 (--top, --workers, --trees...): 0 or -1 would drop results silently."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid positive integer value: {text!r}")
    return value


def seed(text: str) -> int:
    """A seed (:func:`modelatlas.seeding.is_seed`): --seed 2**64 silently repeated the run of --seed 0."""
    from modelatlas.seeding import SEED_RANGE, is_seed

    try:
        value = int(text)
    except ValueError:
        value = None
    if not is_seed(value):
        raise argparse.ArgumentTypeError(f"invalid seed value: {text!r} ({SEED_RANGE})")
    return value


def int_tuple(text: str) -> tuple[int, ...]:
    """Comma-separated integers, e.g. ``1,28,28``."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid comma-separated integers value: {text!r}") from None


def str_tuple(text: str) -> tuple[str, ...]:
    """Comma-separated names, e.g. ``class_subset,transform`` (empty names dropped: ``a,`` is ``a``)."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"invalid comma-separated names value: {text!r}")
    return names


def out_dir(text: str) -> str:
    """An output folder: not empty (``--out ''`` wrote into the current folder and printed 'wrote ')."""
    if not text.strip() or text.strip() == "-":  # '-' reads as standard output, which a folder cannot be
        raise argparse.ArgumentTypeError(f"invalid output folder value: {text!r} (name a folder)")
    return text


def out_path(text: str):
    """:func:`out_dir` as a ``pathlib.Path``."""
    from pathlib import Path

    return Path(out_dir(text))

"""An argparse parser that says how to pass an argument starting with ``-`` (``atlas index search -- -v2 ATLAS``;
the ``atlas index`` and ``atlas probex`` subcommands use it).

argparse reads ``-v2`` as an option it does not know and then reports what is missing (``the following arguments
are required: ATLAS``), which names neither the query nor the fix. Not a command module: ``main`` does not
register it.
"""

from __future__ import annotations

import argparse
import sys


class DashHintParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors, when an argument it was given starts with ``-`` and is
    none of its options, add that ``--`` before it makes it a positional argument."""

    _given: tuple[str, ...] = ()

    def parse_known_args(self, args=None, namespace=None):
        self._given = tuple(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        stray = self.stray_dashed()
        if stray is not None:
            message += (f" ({stray!r} was read as an option: put -- before an argument that starts with '-', "
                        f"as in `{self.prog} -- {stray} ...`)")
        super().error(message)

    def stray_dashed(self) -> str | None:
        """The first argument given that starts with ``-`` and is none of this parser's options (a long one
        may be abbreviated, as argparse allows), None if none; arguments after ``--`` are positional, and so
        is a negative number (``--top -1``: argparse takes it as the value). Time O(arguments x options)."""
        options = [s for a in self._actions for s in a.option_strings]
        for arg in self._given:
            if arg == "--":
                return None
            flag = arg.split("=", 1)[0]
            if arg.startswith("-") and arg != "-" and not _number(arg) and not any(
                    o == flag or (flag.startswith("--") and o.startswith(flag)) for o in options):
                return arg
        return None


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

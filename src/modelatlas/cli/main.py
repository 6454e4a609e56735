"""``atlas``: entry point, subcommand registry and the one error mapper.

Each command module in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds its parser and
sets ``func`` (a thin function that calls one library function and prints the result). Known errors
(:class:`~modelatlas.errors.AtlasError`, missing files, Ctrl-C) become one line on stderr and exit code 1
(130 for Ctrl-C; output piped to a reader that left early, e.g. ``| head``, ends quietly with 141);
``ATLAS_DEBUG=1`` re-raises them with the traceback. The library's warnings
(:class:`~modelatlas.errors.AtlasWarning`) are shown as one ``warning: ...`` line each. A config error names
the flag a command's ``field_flags`` give for a field (:mod:`modelatlas.cli.flags`): ``--match-steps``, not
``match_steps``.
"""

from __future__ import annotations

import os
import sys

EARLY_INTERRUPT = "error: interrupted (before the command started: nothing was read or written)"


def _debug() -> bool:
    """Whether ``ATLAS_DEBUG`` asks for tracebacks in place of the one-line messages."""
    return os.environ.get("ATLAS_DEBUG", "") not in ("", "0")


def _interrupted_early() -> int:
    """Exit code 130 and the one line of a Ctrl-C before any command ran. With ``ATLAS_DEBUG=1`` the caller
    re-raises the interrupt it caught (a bare ``raise``): a new one raised here, inside the handler, was shown
    chained below it, two tracebacks."""
    print(EARLY_INTERRUPT, file=sys.stderr)
    return 130


try:  # Ctrl-C while these load (tqdm: ~0.1 s) came before main() could catch it: a 30-line traceback
    import argparse
    import importlib
    from collections.abc import Sequence
    from pathlib import Path

    from modelatlas import __version__
    from modelatlas.allocator import keep_freed_memory
    from modelatlas.cli.output import one_line, warnings_as_lines
    from modelatlas.errors import AtlasError, AtlasWarning, ConfigError, SettingsMismatchError
    from modelatlas.waiting import short_spin
except KeyboardInterrupt:
    if _debug():
        raise
    sys.exit(_interrupted_early())

COMMAND_MODULES = ["demo", "zoo", "lineage", "probex", "index", "distill", "attribute", "data"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas",
        description="modelatlas: recover model lineage, learn on weights, distill datasets.",
        epilog="Set ATLAS_DEBUG=1 to see full tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"modelatlas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"modelatlas.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"modelatlas.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    for group in sub.choices.values():
        if _subcommands(group):  # `atlas index` alone: main() needs this group's parser, not the top one
            group.set_defaults(group_parser=group)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:  # Ctrl-C while the command modules load (a second or more on a busy machine) was a traceback
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None):
            keep_freed_memory()  # commands train or stream weights: keep freed blocks mapped (ATLAS_MALLOC=default: off)
            short_spin()  # before torch loads: idle OpenMP threads spin briefly, then sleep (modelatlas.waiting)
            _escape_unencodable(sys.stdout)
    except KeyboardInterrupt:
        if _debug():
            raise
        return _interrupted_early()
    if not getattr(args, "func", None):
        group = getattr(args, "group_parser", None)
        if group is not None:  # usage of the group and exit code 2, as argparse does for a missing argument
            group.error(f"choose a subcommand: {', '.join(_subcommands(group))} (see {group.prog} --help)")
        parser.print_help()
        return 0 if args.command is None else 2
    return run_mapped(args.func, args)


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """The names of a command group's subcommands, in the order of its help ([] for a command without any)."""
    return [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]


def run_mapped(func, args: argparse.Namespace) -> int:
    """Run a command, mapping known errors to one line on stderr and exit code 1."""
    debug = _debug()
    try:
        with warnings_as_lines(AtlasWarning):  # the library warns (warnings.warn); only the CLI prints
            code = func(args)
        sys.stdout.flush()  # a reader that left early (`| head`) breaks the pipe here, not at interpreter exit
        return int(code or 0)
    except BrokenPipeError:
        if debug:
            raise
        _drop_stdout()
        return 141  # 128 + SIGPIPE, as a shell tool stopped by the closed pipe
    except KeyboardInterrupt:
        if debug:
            raise
        _error_line(f"interrupted ({_interrupt_hint(args)})")
        return 130
    except (AtlasError, OSError) as e:  # OSError about a file: missing, an --out below a file, disk full, read-only
        if debug or (isinstance(e, OSError) and not e.filename):  # an OSError naming no file is not the user's
            raise
        _error_line(_one_line(e, getattr(args, "field_flags", None)))
        return 1
    except (MemoryError, RuntimeError) as e:  # torch's allocators raise RuntimeErrors; other ones are bugs
        if debug or not _out_of_memory(e):
            raise
        _error_line(_memory_line(e))
        return 1


def _error_line(message: str) -> None:
    """``error: <message>`` on stderr, escaped as all CLI output is (:func:`~modelatlas.cli.output.printable`): a
    model named by bytes that are not UTF-8 reads ``m\\xe9``, as elsewhere, not ``m\\udce9``, and cannot end a
    strict UTF-8 stderr in a UnicodeEncodeError; a control character in a name cannot reach the terminal."""
    print(f"error: {one_line(message)}", file=sys.stderr)


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation: MemoryError (NumPy, Python), torch.OutOfMemoryError (CUDA) or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: not enough memory" / "can't allocate memory"), which ended a command in a traceback."""
    text = str(e).lower()
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or any(w in text for w in ("not enough memory", "out of memory", "can't allocate memory")))


def _memory_line(e: BaseException) -> str:
    """'out of memory (N GiB asked for at once): ...' with the size when the message gives it."""
    import re

    m = re.search(r"allocate (\d+(?:\.\d+)?) ?(bytes|[KMGT]i?B)", str(e))
    size = ""
    if m and m.group(2) == "bytes":
        size = f" ({int(m.group(1)) / 2**30:,.1f} GiB asked for at once)"
    elif m:
        size = f" ({m.group(1)} {m.group(2)} asked for at once)"
    return (f"out of memory{size}: lower the sizes this command was given (widths, ranks, batch sizes, "
            "--ipc, models read at once) or free memory; ATLAS_DEBUG=1 shows where")


def _interrupt_hint(args: argparse.Namespace) -> str:
    """What an interrupted command kept: its ``interrupt_hint`` with ``{out}`` filled in, unless it stopped
    before saving anything there (the hint then promised progress in a folder that was never written)."""
    hint = getattr(args, "interrupt_hint", None)
    if callable(hint):  # a command that reads what it kept (`atlas attribute`)
        hint = hint(args)
    if not hint:
        return "outputs are written when a command finishes: nothing partial was left"
    out = getattr(args, "out", None)
    if "{out}" in hint and out is not None and not _holds_files(Path(out)):
        again = ", without --resume" if hasattr(args, "resume") else ""  # `atlas zoo merge` has no --resume
        return f"stopped before anything was saved in {out}: run the command again{again}"
    return hint.replace("{out}", str(out or "the --out folder"))


def _holds_files(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(folder.iterdir())
    except OSError:
        return False


def _escape_unencodable(stream) -> None:
    """Write characters ``stream``'s encoding lacks (✓, tree branches, a model's name) as ``\\u2713``: output
    redirected on Windows (cp1252) ended in a UnicodeEncodeError traceback after the whole command."""
    encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if encoding not in ("utf8", "utf8sig"):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # a stream that cannot be reconfigured (a notebook's)
            pass


def _drop_stdout() -> None:
    """Point stdout at the null device, so that flushing what is still buffered at exit cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (captured by a test or a notebook)
        pass


def _one_line(e: BaseException, field_flags: dict | None = None) -> str:
    """The message of ``e`` on one line; a config error's fields, and the setting a refused resume names,
    named by the flags that set them (``field_flags`` of the command, :mod:`modelatlas.cli.flags`)."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, SettingsMismatchError) and e.key in (field_flags or {}):  # "rank_u was 32": which flag?
        return " ".join(e.with_flag(field_flags[e.key]).split())
    if isinstance(e, ConfigError) and field_flags:
        from modelatlas.cli.flags import named_by_flags

        text = named_by_flags(text, field_flags)
    return text


if __name__ == "__main__":
    sys.exit(main())

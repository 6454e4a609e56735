"""The documentation cannot rot silently: every ```python block of README.md and docs/*.md (docs/benchmarks.md,
a log of measurements, aside) runs, and every ``atlas ...`` command line in them parses with the real parser.

Python blocks run as written, each in a fresh namespace and an empty working directory, so an example must
make what it reads (a tiny zoo, a few tensors). A block that needs the reader's own files is an excerpt: an
HTML comment ``<!-- not run: REASON -->`` on the line before its fence skips it, visibly, with the reason.

Commands are parsed, never run: ``modelatlas.cli.main.build_parser`` parses each one, and every flag must be
an option of the (sub)command it is given to, spelled out (argparse would take an abbreviation, which a new
flag can make ambiguous). Placeholders (PATH, <folder>) are plain arguments. A command in prose (inline code)
or one with ``...`` elides arguments: a missing required argument or flag value is fine there, a wrong flag
is not. In
prose, ``run|poster|eval`` names alternatives (each is parsed) and ``atlas COMMAND`` stands for every command.
Time: the blocks train tiny models (a few seconds in all); parsing is O(commands x flags).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelatlas.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md")]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
SKIP = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
INLINE = re.compile(r"`(atlas\b[^`]*)`")
# what prose may leave out: a required argument, the value of a flag it names (`--ipc`)
ELIDED = ("the following arguments are required", "expected one argument")


@dataclass(frozen=True)
class Block:
    """A fenced code block: its page, the line of its opening fence, its language and text."""

    page: Path
    line: int
    lang: str
    text: str
    skip: str | None  # the reason of a `<!-- not run: ... -->` before it

    @property
    def where(self) -> str:
        return f"{_name(self.page)}:{self.line}"


@dataclass(frozen=True)
class Command:
    """One ``atlas`` command line of a page: where it is, its words (``atlas`` dropped), whether it may elide
    required arguments (prose, or ``...``)."""

    where: str
    words: tuple[str, ...]
    partial: bool


def _name(page: Path) -> str:
    """The page's path from the repository root (its name outside it: a test's page)."""
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


def make_blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, in order."""
    blocks, lines, fence = [], page.read_text(encoding="utf-8").splitlines(), None
    for i, line in enumerate(lines):
        if fence is None and line.startswith("```"):
            prev = next((x for x in reversed(lines[:i]) if x.strip()), "")
            skip = SKIP.search(prev)
            fence = (i, line[3:].strip(), skip.group(1) if skip else None)
        elif fence is not None and line.startswith("```"):
            start, lang, reason = fence
            blocks.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:i]), reason))
            fence = None
    return blocks


def _prose(page: Path) -> str:
    """The page with its fenced blocks blanked (line numbers kept), for the inline code between them."""
    out, inside = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        fence = line.startswith("```")
        out.append("" if inside or fence else line)
        inside ^= fence
    return "\n".join(out)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(offset of its first line, text) of each line of a shell block, continuation lines (``\\``) joined."""
    out, parts, start = [], [], 0
    for k, line in enumerate(text.splitlines()):
        if not parts:
            start = k
        parts.append(line.rstrip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            out.append((start, " ".join(parts).strip()))
            parts = []
    return out


def _shell_commands(block: Block) -> list[Command]:
    """The ``atlas`` commands of a shell block: comments dropped, each command of ``a && b``, ``a; b`` or
    ``a | b`` on its own, leading ``VAR=value`` words and ``$`` prompts skipped."""
    found = []
    for offset, text in _logical_lines(block.text):
        lexer = shlex.shlex(text.removeprefix("$ "), posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        for is_punct, group in itertools.groupby(list(lexer), lambda w: set(w) <= set(";&|")):
            words = [w for w in group if w not in ("do", "then", "time")]
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                words.pop(0)
            if not is_punct and words and words[0] == "atlas":
                found.append(Command(f"{_name(block.page)}:{block.line + 1 + offset}",
                                     tuple(w for w in words[1:] if w != "..."), "..." in words))
    return found


def _alternatives(word: str, commands: list[str]) -> list[str]:
    """What one word of a command in prose stands for: ``run|poster|eval`` each of its parts, ``COMMAND``
    every command, any other word itself."""
    if word == "COMMAND":
        return commands
    return word.split("|") if "|" in word and not word.startswith("-") else [word]


def _inline_commands(page: Path, commands: list[str]) -> list[Command]:
    """The ``atlas`` commands in the page's inline code (outside fenced blocks; one may wrap a line), each
    alternative of a ``run|poster`` word a command of its own."""
    found, prose = [], _prose(page)
    for m in INLINE.finditer(prose):
        where = f"{_name(page)}:{prose.count(chr(10), 0, m.start()) + 1}"
        text = " ".join(m.group(1).split())
        try:
            words = shlex.split(text)[1:]
        except ValueError as e:  # an unbalanced quote: no shell would take it either
            found.append(Command(where, (f"<{text}: {e}>",), False))
            continue
        for choice in itertools.product(*(_alternatives(w, commands) for w in words if w != "...")):
            found.append(Command(where, choice, True))
    return found


def make_commands(pages: list[Path]) -> list[Command]:
    """Every ``atlas`` command of ``pages``: those of shell blocks, then those in prose."""
    commands = list(_subparsers(parser()))
    found = []
    for page in pages:
        found += [c for b in make_blocks(page) if b.lang in SHELL_FENCES for c in _shell_commands(b)]
        found += _inline_commands(page, commands)
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name, p in a.choices.items()}


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def check_flags(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> str | None:
    """The first flag that is not an option of the (sub)command it is given to, spelled out; None if none."""
    for i, word in enumerate(words):
        if word == "--":
            return None
        if word.startswith("-") and word != "-" and not _is_number(word):
            flag = word.split("=", 1)[0]
            if flag not in {s for a in parser._actions for s in a.option_strings}:
                return f"{parser.prog} has no option {flag}"
        elif word in _subparsers(parser) and not (i and words[i - 1].startswith("-")):
            parser = _subparsers(parser)[word]
    return None


@functools.cache
def parser() -> argparse.ArgumentParser:
    """The CLI's parser, built once (parsing leaves it as it was)."""
    return build_parser()


class _Refused(Exception):
    pass


class _Done(Exception):
    pass


def check_parses(words: tuple[str, ...], partial: bool, monkeypatch) -> str | None:
    """Why the real parser refuses ``atlas WORDS`` (None if it takes them; a missing required argument is
    fine where ``partial``, and so is a flag without its value). ``--help`` and ``--version`` count as taken."""
    def error(self, message):
        raise _Refused(f"{self.prog}: {message}")

    def done(self, status=0, message=None):
        raise _Done

    monkeypatch.setattr(argparse.ArgumentParser, "error", error)
    monkeypatch.setattr(argparse.ArgumentParser, "exit", done)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            parser().parse_args(list(words))
        except _Done:
            return None
        except _Refused as e:
            return None if partial and any(x in str(e) for x in ELIDED) else str(e)
    return None


COMMANDS = make_commands(PAGES)


def test_the_pages_show_commands():
    """The search itself works: the README's own commands are among those found."""
    found = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/lineage.md", "docs/distill.md"} <= found and len(COMMANDS) > 50


def check_command(command: Command, monkeypatch) -> str | None:
    """Why ``command`` is refused, with its page and line; None if the parser takes it."""
    why = check_flags(parser(), command.words) or check_parses(command.words, command.partial, monkeypatch)
    return why and f"{command.where}: `{shlex.join(('atlas', *command.words))}`: {why}"


def test_a_renamed_flag_fails_with_its_page_and_line(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("Run `atlas lineage recover ./zoo --pgn f.png` or\n\n```bash\nls && atlas demo \\\n"
                    "   --wrkers 2   # two\natlas demo --out DIR\n```\n`atlas lineage recover --png`\n")
    found = make_commands([page])
    assert [(c.where, c.words) for c in found] == [
        ("page.md:4", ("demo", "--wrkers", "2")), ("page.md:6", ("demo", "--out", "DIR")),
        ("page.md:1", ("lineage", "recover", "./zoo", "--pgn", "f.png")), ("page.md:8", ("lineage", "recover", "--png"))]
    assert [check_command(c, monkeypatch) for c in found] == [
        "page.md:4: `atlas demo --wrkers 2`: atlas demo has no option --wrkers", None,
        "page.md:1: `atlas lineage recover ./zoo --pgn f.png`: atlas lineage recover has no option --pgn", None]


def test_a_bad_value_fails_and_prose_may_elide(monkeypatch):
    bad = Command("p.md:1", ("demo", "--workers", "lots"), True)
    assert "--workers: invalid" in check_command(bad, monkeypatch)
    missing = ("lineage", "recover", "--png", "f.png")
    assert "required" in check_command(Command("p.md:2", missing, False), monkeypatch)
    assert check_command(Command("p.md:3", missing, True), monkeypatch) is None


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_command_parses(command: Command, monkeypatch):
    why = check_command(command, monkeypatch)
    assert why is None, why


BLOCKS = [b for page in PAGES for b in make_blocks(page) if b.lang == "python"]


def run_block(block: Block) -> dict:
    """Run ``block`` in a fresh namespace (in the current directory); a traceback gives the page's own line
    numbers. Returns the namespace."""
    namespace = {"__name__": "__docs__"}
    code = compile("\n" * block.line + block.text, _name(block.page), "exec")
    exec(code, namespace)  # noqa: S102 - the documentation's own examples
    return namespace


def test_a_block_marked_not_run_is_skipped_with_its_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- not run: needs your checkpoints -->\n```python\nopen('mine')\n```\n\n"
                    "```python\nx = 1 + 1\n```\n")
    blocks = make_blocks(page)
    assert [(b.where, b.lang, b.text, b.skip) for b in blocks] == [
        ("page.md:2", "python", "open('mine')", "needs your checkpoints"), ("page.md:6", "python", "x = 1 + 1", None)]
    assert run_block(blocks[1])["x"] == 2
    with pytest.raises(NameError) as e:
        run_block(Block(page, 6, "python", "y = x", None))
    assert str(e.traceback[-1].path) == "page.md" and e.traceback[-1].lineno == 6  # 0-based: the page's line 7


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"{block.where}: not run: {block.skip}")
    monkeypatch.chdir(tmp_path)
    run_block(block)

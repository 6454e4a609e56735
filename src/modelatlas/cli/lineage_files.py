"""The output files of ``atlas lineage recover`` (``--out``, ``--dot``, ``--mermaid``, ``--png``): refused
before the recovery where they cannot or must not be written, written after it. Not a command module:
``main`` does not register it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from modelatlas.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    cannot_write,
    file_in_the_way,
    not_a_folder,
    peek_json_object,
    unwritable,
)
from modelatlas.cli.output import echo
from modelatlas.errors import ConfigError


def out_file(text: str) -> Path:
    """An output file: not empty (``--out ''`` is the current folder: a traceback after the whole recovery)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"invalid output file value: {text!r} (name a file)")
    if text.strip() == "-":  # wrote a file named '-' where the user expected standard output
        raise argparse.ArgumentTypeError("invalid output file value: '-' (standard output is not supported: "
                                         "name a file)")
    return Path(text)


# each output's suffix, as docs/lineage.md names the files, and what it writes
SUFFIXES = {"out": ".json", "dot": ".dot", "mermaid": ".mmd", "png": ".png"}
_WRITES = {"out": "the forest as JSON", "dot": "a Graphviz DOT graph", "mermaid": "a Mermaid graph"}


def check_out_files(args: argparse.Namespace) -> None:
    """Refuse, before the work, an output file that is a folder, lies below a file or where no file can be made
    (each was reported only after the recovery), and a --png not named .png or another output named .png."""
    for option in ("out", "dot", "mermaid", "png"):
        path = getattr(args, option)
        if path is None:
            continue
        if path.is_dir():
            raise ConfigError(f"--{option} {path} is a folder; name a file to write (e.g. {path / 'lineage'}"
                              f"{SUFFIXES[option]})")
        above = file_in_the_way(path.parent)
        if above is not None:
            raise ConfigError(f"--{option} {path} lies below {not_a_folder(above)}, not a folder; choose another path")
        denied = unwritable(path.parent)  # /proc/version, a read-only mount: refused after the recovery
        if denied is not None:
            raise ConfigError(f"{cannot_write(f'--{option} {path}', denied)}; choose another path")
        check_suffix(option, path)


def check_suffix(option: str, path: Path) -> None:
    """Refuse a --png whose name does not end in .png (`--png forest.mmd` wrote the image under the Mermaid
    file's name without a word; a viewer or Mermaid then opens garbage), and a text output named .png (the
    image one expected is text). Other suffixes of the text outputs are taken as given (.gv, .txt, .md)."""
    png = path.suffix.lower() == ".png"
    if option == "png" and not png:
        raise ConfigError(f"--png {path}: --png writes a PNG image; name it {path.with_suffix('.png')}"
                          + (f" (--{_named(path)} writes the {path.suffix} file)" if _named(path) else ""))
    if option != "png" and png:
        raise ConfigError(f"--{option} {path}: --{option} writes {_WRITES[option]}, not an image; name it "
                          f"{path.with_suffix(SUFFIXES[option])} (--png draws the forest as a PNG image)")


def _named(path: Path) -> str | None:
    """The other output whose suffix ``path`` has ("mermaid" for forest.mmd), or None."""
    return next((o for o, s in SUFFIXES.items() if s == path.suffix.lower() and o != "png"), None)


def _forest_or_nothing(path: Path) -> bool:
    """Whether ``path`` is missing, empty or a forest JSON an earlier recovery wrote (rewritten by a rerun)."""
    if not path.is_file() or path.stat().st_size == 0:
        return True
    data = peek_json_object(path)
    return data is not None and "nodes" in data and "edges" in data


def check_outputs_spare_inputs(args: argparse.Namespace, models: list[Path], truth) -> None:
    """Refuse an output file that is a model to read (or a file inside a model folder), the --truth manifest, the
    manifest of a zoo whose models are given, or another option's output: it was written after the recovery, replacing the model or manifest for good;
    and an --out file that holds something else than a forest JSON."""
    inputs = {Path(os.path.realpath(m)): m for m in models if Path(m).exists()}
    source = getattr(truth, "source", None)
    taken: dict[Path, str] = {Path(os.path.realpath(source)): "the --truth manifest"} if source else {}
    for manifest in {Path(m).parent / "manifest.json" for m in models}:  # a given zoo's true lineage and config
        if manifest.is_file():
            taken.setdefault(Path(os.path.realpath(manifest)), f"the zoo manifest {manifest}")
    for option in ("out", "dot", "mermaid", "png"):
        path = getattr(args, option)
        if path is None:
            continue
        real = Path(os.path.realpath(path))
        model = next((m for m in inputs if real == m or (m in real.parents and real.exists())), None)
        what = f"the model {inputs[model]}" if model is not None else taken.get(real)
        if what is not None:
            raise ConfigError(f"--{option} {path} would overwrite {what}; choose another file")
        taken[real] = f"the --{option} file"
    if args.out is not None and not _forest_or_nothing(args.out):  # a distillation's result.json was replaced
        raise ConfigError(f"--out {args.out} holds another file than a lineage forest (JSON with 'nodes' and "
                          "'edges'), which it would replace; choose another file, or delete it first")


def write_outputs(args: argparse.Namespace, forest, truth) -> None:
    from modelatlas.lineage.export import to_dot, to_mermaid
    from modelatlas.lineage.scoring import edge_marks, error_notes, score_forest

    marks, notes = (edge_marks(forest, truth), error_notes(forest, truth)) if truth is not None else (None, None)
    if args.out:
        data = forest.to_dict()
        if truth is not None:
            data["scores"] = score_forest(forest, truth).as_dict()
        from modelatlas.atomic import atomic_write_json

        atomic_write_json(args.out, data)
        echo(f"wrote {args.out}")
    if args.dot:
        atomic_write_text(args.dot, to_dot(forest, marks))
        echo(f"wrote {args.dot}")
    if args.mermaid:
        atomic_write_text(args.mermaid, to_mermaid(forest, marks, notes))
        echo(f"wrote {args.mermaid}")
    if args.png:
        from modelatlas.lineage.plot import render_forest

        atomic_write_bytes(args.png, render_forest(forest, marks))
        echo(f"wrote {args.png}")

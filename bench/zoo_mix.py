"""Zoos recovered together in one call, for the stage benchmarks (``lineage_known_stage.py``,
``lineage_mixed_stage.py``): each zoo's models linked under a prefix (every zoo names its models t0, t0.0, ...),
and the end of their main(): each row printed as a JSON line as it comes, ``--json`` the list, then the table.
Imported as a sibling (``python bench/X.py`` puts bench/ on sys.path).
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path


def linked(targets: dict[str, Path], truth: dict[str, str | None], folder: Path, prefix: str
           ) -> tuple[list[Path], dict[str, str | None]]:
    """Symlinks folder/<prefix><name> to each ``targets[name]`` (kept when there: runs resume), in the targets'
    order, and ``truth`` (model -> parent or None) under the prefixed names."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, target in targets.items():
        out.append(folder / f"{prefix}{name}")
        if not out[-1].exists():
            out[-1].symlink_to(target.resolve())
    return out, {prefix + n: None if p is None else prefix + p for n, p in truth.items()}


def report(ap: argparse.ArgumentParser, rows_of: Callable[[argparse.Namespace], Iterable[dict]],
           table: Callable[[list[dict]], str]) -> None:
    """main()'s tail: ``--json`` added to ``ap``, the arguments parsed, each row of ``rows_of(args)`` printed as a
    JSON line as it comes, all rows written to ``--json`` (given) and their ``table`` printed."""
    ap.add_argument("--json", type=Path, help="the rows, as a JSON list")
    args = ap.parse_args()
    rows = []
    for row in rows_of(args):
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))

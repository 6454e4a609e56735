"""Which edge distance places a quantized zoo's trees best? Each tree's distance forced, on folders that
``bench/lineage_quantized.py --replace --share 1.0 --kinds T`` wrote (every model a GGUF file of one type T).

    python bench/lineage_quantized.py /tmp/zoos/* --replace --share 1.0 --kinds Q4_0 --work /tmp/q4
    python bench/lineage_distance_choice.py --work /tmp/q4 /tmp/zoos/*

Per zoo, the directed edges right (and reversed) under: ``auto`` (as the library chooses), ``auto-s31``
(the choice before session 32: no :func:`~modelatlas.lineage.tree_distance._one_rounding` rule), ``l2``
(debiased RMS), ``rank`` (the ranks over the rounding noise), ``nuclear*rank`` (nuclear norm x the rank
before the shrinkage) and ``nuclear*signal`` (nuclear norm x the rank over the noise), every tree alike; then
the distance ``auto`` chose per tree and the LoRA test's figures on the tree's RMS MST edges (0.9 quantile
of the signal-rank fraction, median share of the update those ranks carry). Forcing replaces
``tree_distance._auto_kind`` and ``_one_rounding`` for the run (the library has no option for it). A model
is scored as its file (``NAME-t.gguf``): with one type, each model has one.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)

import argparse
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np

from modelatlas.lineage import recover_lineage, tree_distance
from modelatlas.lineage.scoring import edge_errors, score_forest
from modelatlas.zoo.manifest import load_manifest

# name -> (the kind _auto_kind returns or None for its own, what _one_rounding returns or None for its own)
CHOICES = {"auto": (None, None), "auto-s31": (None, False), "l2": ("l2", False), "rank": ("rank", False),
           "nuclear*rank": ("nuclear*rank", False), "nuclear*signal": ("nuclear*rank", True)}


def recover(files: list[Path], choice: str, seen: list):
    """The forest with the tree distances of ``choice``; ``seen`` gets (kind, q90 signal rank, median shown)
    per tree as ``auto`` reads it."""
    kind, one = CHOICES[choice]
    own = tree_distance._auto_kind

    def auto_kind(rms, low, shown, paper):
        edges = tree_distance._mst_edges(rms)
        seen.append((own(rms, low, shown, paper), float(np.quantile(low[edges[:, 0], edges[:, 1]], 0.9)),
                     float(np.median(shown[edges[:, 0], edges[:, 1]]))))
        return own(rms, low, shown, paper) if kind is None else kind

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(tree_distance, "_auto_kind", auto_kind))
        if one is not None:
            stack.enter_context(mock.patch.object(tree_distance, "_one_rounding", lambda *a: one))
        return recover_lineage(files)


def zoo_row(zoo: Path, work: Path, totals: dict) -> str:
    manifest = load_manifest(zoo / "manifest.json")
    files = sorted((work / zoo.name).iterdir())
    file_of = {f.stem.rsplit("-", 1)[0] if f.suffix == ".gguf" else f.stem: f.stem for f in files}
    truth = {file_of.get(c, c): None if p is None else file_of.get(p, p) for c, p in manifest.parents().items()}
    cells, seen = [zoo.name], []
    for choice in CHOICES:
        seen.clear()
        forest = recover(files, choice, seen)
        score, errors = score_forest(forest, truth), Counter(edge_errors(forest, truth).values())
        totals[choice][0] += score.n_correct
        totals[choice][1] += score.n_true_edges
        totals[choice][2].update(errors)
        cells.append(f"{score.n_correct}/{score.n_true_edges} ({errors['reversed']})")
    cells.append(", ".join(f"{k} {q:.2f} / {s:.2f}" for k, q, s in seen))
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of bench/lineage_quantized.py")
    args = ap.parse_args()
    totals = {c: [0, 0, Counter()] for c in CHOICES}
    print("| zoo | " + " | ".join(f"{c}: right (reversed)" for c in CHOICES) + " | auto per tree: q90 signal / shown |")
    print("|---" * (len(CHOICES) + 2) + "|")
    for zoo in args.zoos:
        if (zoo / "manifest.json").is_file() and (args.work / zoo.name).is_dir():
            print(zoo_row(zoo, args.work, totals), flush=True)
    for c, (right, n, errors) in totals.items():
        print(f"{c}: {right}/{n}, wrong edges by kind {dict(errors)}")


if __name__ == "__main__":
    main()

"""Is the edge score readable as confidence? How well it tells right from wrong directed edges on built zoos.

    python bench/lineage.py --suite demo-seeds --work /tmp/zoos      # (any suites; it builds the zoos)
    python bench/lineage_scores.py /tmp/zoos/* --json scores.json

For every zoo folder (one holding a manifest.json), lineage is recovered with the defaults and each recovered
edge is marked right (a true edge, right direction) or wrong (reversed or not a true edge). Printed per zoo
and pooled: the AUC of the score (the chance that a right edge outscores a wrong one; 0.5 is no signal) and
how many right edges score below 0.05 (a user would read those as guesses). The score does not change which
edges are recovered, so accuracy is the same whatever the score rule.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
from pathlib import Path

import numpy as np

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.scoring import edge_marks
from modelatlas.zoo.manifest import load_manifest

LOW = 0.05


def auc(right: list[float], wrong: list[float]) -> float:
    """P(a right edge's score > a wrong one's), ties counting half; NaN without both kinds. Time O(R W)."""
    if not right or not wrong:
        return float("nan")
    r, w = np.asarray(right)[:, None], np.asarray(wrong)[None, :]  # (R, 1), (1, W)
    return float(((r > w) + 0.5 * (r == w)).mean())


def zoo_scores(folder: Path) -> tuple[list[float], list[float]]:
    """(scores of right edges, scores of wrong edges) of one zoo, recovered with the defaults."""
    manifest = load_manifest(folder / "manifest.json")
    forest = recover_lineage([manifest.path_of(m.name) for m in manifest.models])
    score = {(e.parent, e.child): float(e.score) for e in forest.edges}
    marks = edge_marks(forest, manifest)
    right = [score[k] for k, m in marks.items() if m == "right"]
    wrong = [score[k] for k, m in marks.items() if m in ("reversed", "wrong")]
    return right, wrong


def line(name: str, right: list[float], wrong: list[float]) -> str:
    low = sum(s < LOW for s in right)
    mean = f"{np.mean(right):.3f}" if right else "-"
    return (f"| {name} | {len(right)} | {len(wrong)} | {auc(right, wrong):.3f} | {low} "
            f"| {sum(s < LOW for s in wrong)} | {mean} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoos", nargs="+", type=Path, help="zoo folders (each with a manifest.json)")
    ap.add_argument("--json", type=Path, help="write every zoo's right and wrong scores here")
    args = ap.parse_args()
    rows = {z.name: zoo_scores(z) for z in args.zoos if (z / "manifest.json").is_file()}
    print(f"| zoo | right | wrong | AUC | right < {LOW} | wrong < {LOW} | mean right |\n|---|---|---|---|---|---|---|")
    for name, (right, wrong) in rows.items():
        print(line(name, right, wrong), flush=True)
    pooled = [s for r, _ in rows.values() for s in r], [s for _, w in rows.values() for s in w]
    print(line(f"pooled ({len(rows)} zoos)", *pooled))
    if args.json:
        args.json.write_text(json.dumps({k: {"right": r, "wrong": w} for k, (r, w) in rows.items()}))


if __name__ == "__main__":
    main()

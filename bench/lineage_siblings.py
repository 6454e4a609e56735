"""Can a second look tell a misplaced sibling from a real grandchild? Two tests, measured, not adopted.

    python bench/lineage.py --suite stars --work /tmp/zoos          # (and any suites with chains)
    python bench/lineage_siblings.py /tmp/zoos/*

For every recovered edge b -> c whose parent b has a recovered parent a, with the zoo's manifest: "right" when
c's true parent is b (a real chain), "sibling" when b and c are both children of a (the star error). Printed
per label: percentiles of
- depth: d(a, c) / d(a, b), the recovery's own distances (a sibling need not be farther from a than b);
- inherited: the cosine of the updates b - a and c - a after removing each one's best rank-4 part, averaged
  over 2-D layers (a grandchild carries its parent's own update; a sibling should not).
See docs/lineage.md, "Stars". Time: one recovery per zoo plus an SVD per 2-D layer and triple.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
from pathlib import Path

import numpy as np
import torch

from modelatlas.lineage import LineageRecovery
from modelatlas.weights import open_checkpoint
from modelatlas.zoo.manifest import load_manifest

RANK = 4


def high_rank(d: torch.Tensor) -> torch.Tensor:
    """``d`` less its best rank-RANK approximation."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return d - (u[:, :RANK] * s[:RANK]) @ vh[:RANK]


def inherited(wa: dict, wb: dict, wc: dict) -> float:
    cos = [torch.nn.functional.cosine_similarity(high_rank(wb[k] - wa[k]).flatten(),
                                                 high_rank(wc[k] - wa[k]).flatten(), 0).item() for k in wa]
    return float(np.mean(cos))


def layers(path: Path) -> dict:
    ck = open_checkpoint(path)
    return {t.name: ck.read(t.name).float() for t in ck.tensors() if len(t.shape) == 2 and min(t.shape) > RANK}


def zoo_triples(folder: Path) -> list[tuple[str, float, float]]:
    """(label, depth ratio, inherited cosine) for each recovered two-step path a -> b -> c of one zoo."""
    manifest = load_manifest(folder / "manifest.json")
    truth = {m.name: m.parent for m in manifest.models}
    est = LineageRecovery().fit([manifest.path_of(m.name) for m in manifest.models])
    index = {n: i for i, n in enumerate(est.names_)}
    parent = {e.child: e.parent for e in est.edges_}
    out = []
    for c, b in parent.items():
        a = parent.get(b)
        label = "right" if truth.get(c) == b else "sibling" if truth.get(c) == truth.get(b) == a else None
        if a is None or label is None:
            continue
        wa, wb, wc = (layers(manifest.path_of(n)) for n in (a, b, c))
        if {k: v.shape for k, v in wa.items()} != {k: v.shape for k, v in wc.items()}:
            continue  # another architecture: no update to compare
        depth = est.distances_[index[a], index[c]] / est.distances_[index[a], index[b]]
        out.append((label, float(depth), inherited(wa, wb, wc)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoos", nargs="+", type=Path, help="zoo folders (each with a manifest.json)")
    rows = [t for z in ap.parse_args().zoos if (z / "manifest.json").is_file() for t in zoo_triples(z)]
    print("| label | paths | depth ratio: min / 10% / 50% / 90% / max | inherited cosine: min / 10% / 50% / 90% / max |")
    print("|---|---|---|---|")
    for label in ("right", "sibling"):
        got = np.array([r[1:] for r in rows if r[0] == label]).reshape(-1, 2)  # (paths, 2)
        if len(got):
            q = np.percentile(got, [0, 10, 50, 90, 100], axis=0).round(2)  # (5, 2)
            print(f"| {label} | {len(got)} | {' / '.join(map(str, q[:, 0]))} | {' / '.join(map(str, q[:, 1]))} |")


if __name__ == "__main__":
    main()

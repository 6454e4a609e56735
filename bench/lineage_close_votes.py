"""Do kurtosis votes tell a close call's true parent? Measured on the suites, not adopted (session 37).

    python bench/lineage.py --suite stars --work /tmp/zoos          # and accuracy, heldout, heldout2
    python bench/lineage_close_votes.py /tmp/zoos/star_*             # one group of zoos at a time

For every recovered edge p -> c with a runner-up parent q (the nearest model outside c's subtree,
``Edge.runner_up``), the scaled kurtosis vote of p -> c and of q -> c: the mean over 2-D layers of
tanh(s (k_l(u) - k_l(c)) / m_l), s the recovered stage's sign and m_l the median |k_l change| over the zoo's
recovered edges (lineage.root's rule, per zoo instead of per tree; kurtosis in float64 from the files). Then,
for each rule "re-hang c on q when the edge is a close call (ratio <= R) and VOTE", how many wrong edges it
would fix (q is the true parent) and how many right edges it would break. Reversed edges are left out (their
runner-up answers another question). Time: one recovery per zoo plus one pass over each model's layers.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
from pathlib import Path

import numpy as np

from modelatlas.lineage import LineageRecovery
from modelatlas.weights import open_checkpoint
from modelatlas.zoo.manifest import load_manifest

RULES = {"q's vote > p's": lambda vp, vq: vq > vp,
         "q's vote > p's + 0.2": lambda vp, vq: vq > vp + 0.2,
         "p's vote < 0 < q's": lambda vp, vq: vp < 0 < vq}


def layer_kurtosis(path: Path) -> np.ndarray:
    """(L,) Fisher kurtosis of each 2-D tensor of one checkpoint, in float64, in name order."""
    ck = open_checkpoint(path)
    out = []
    for t in sorted(ck.tensors(), key=lambda t: t.name):
        if len(t.shape) >= 2:
            x = ck.read(t.name).double().flatten()
            x = x - x.mean()
            out.append(float((x**4).mean() / (x**2).mean() ** 2 - 3))
    return np.array(out)


def zoo_rows(folder: Path) -> list[dict]:
    """One row per recovered edge with a runner-up: right, runner-up true, ratio, the two votes."""
    manifest = load_manifest(folder / "manifest.json")
    truth = {m.name: m.parent for m in manifest.models}
    est = LineageRecovery().fit([manifest.path_of(m.name) for m in manifest.models])
    k = {n: layer_kurtosis(manifest.path_of(n)) for n in est.names_}
    s = 1.0 if est.stage_ == "specialize" else -1.0
    d = np.array([s * (k[e.parent] - k[e.child]) for e in est.edges_])  # (E, L)
    scale = np.array([np.median(np.abs(col[col != 0])) if (col != 0).any() else np.inf for col in d.T])  # (L,)

    def vote(u: str, c: str) -> float:
        return float(np.tanh(s * (k[u] - k[c]) / scale).mean())

    return [dict(right=truth.get(e.child) == e.parent, true_q=truth.get(e.child) == e.runner_up,
                 ratio=e.runner_up_ratio, vp=vote(e.parent, e.child), vq=vote(e.runner_up, e.child))
            for e in est.edges_ if e.runner_up is not None and np.isfinite(e.runner_up_ratio)
            and truth.get(e.parent) != e.child]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+", type=Path, help="zoo folders (each with its manifest.json)")
    ap.add_argument("--ratios", default="1.05,1.1,1000", help="close-call ratios R to try")
    args = ap.parse_args()
    rows = [r for z in args.zoos for r in zoo_rows(z)]
    print(f"{len(args.zoos)} zoos, {len(rows)} edges with a runner-up (not reversed), "
          f"{sum(not r['right'] for r in rows)} wrong, {sum(not r['right'] and r['true_q'] for r in rows)} of "
          "them with the true parent as runner-up")
    print("| close (ratio <=) | rule | close calls (wrong) | fixed | broken |\n|---|---|---|---|---|")
    for ratio in (float(x) for x in args.ratios.split(",")):
        close = [r for r in rows if r["ratio"] <= ratio]
        for name, rule in RULES.items():
            hit = [r for r in close if rule(r["vp"], r["vq"])]
            fixed = sum(not r["right"] and r["true_q"] for r in hit)
            print(f"| {ratio:g} | {name} | {len(close)} ({sum(not r['right'] for r in close)}) | {fixed} | "
                  f"{sum(r['right'] for r in hit)} |")


if __name__ == "__main__":
    main()

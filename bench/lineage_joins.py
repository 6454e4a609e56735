"""Time of the shared-layer joins (:func:`modelatlas.lineage.shared_layers.joined_signatures`) on folders of many
layer sets, as a hub cache of many architectures gives: headers only, no weights.

    python bench/lineage_joins.py

Each synthetic layer set is a BERT-like encoder of 4-11 blocks (q, k, v, o of width x width) at one of
``widths`` widths (multiples of 64), with or without a square head (pooler, classifier, LM head,
pre-classifier) and a prefix (``model.``, ``language_model.``), drawn with a seeded generator. Printed per
row: the shape families (layer sets linked by a shape they hold, the only ones that can join), how many sets
were joined into how many groups, and the time of the call. Families of more than ``MAX_SIGNATURES`` (64) sets
are compared apart.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import random
import time

from modelatlas.lineage.shared_layers import joined_signatures, shape_families

HEADS = ([], ["pooler.dense"], ["classifier.dense"], ["lm_head.dense"], ["pre_classifier"])
ROWS = ((64, 13), (200, 20), (400, 40), (1000, 13), (1000, 100))  # (layer sets, widths)


def make_layer_sets(n: int, widths: int, seed: int) -> list[tuple]:
    """``n`` distinct sorted (name, shape) signatures over ``widths`` widths. O(n T)."""
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        w = 64 * rng.randrange(1, widths + 1)
        names = [f"encoder.layer.{i}.{p}" for i in range(rng.randrange(4, 12)) for p in ("q", "k", "v", "o")]
        prefix = rng.choice(["", "", "model.", "language_model."])
        out.add(tuple(sorted((prefix + name, (w, w)) for name in names + rng.choice(HEADS))))
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| layer sets | widths | shape families (largest) | sets joined -> groups | s |")
    print("|---|---|---|---|---|")
    for n, widths in ROWS:
        sigs = make_layer_sets(n, widths, args.seed)
        families = shape_families(sigs)
        t = time.perf_counter()
        got = joined_signatures(sigs)
        dt = time.perf_counter() - t
        groups = len({v[0] for v in got.values()})
        print(f"| {n} | {widths} | {len(families)} ({max(map(len, families))}) | {len(got)} -> {groups} | {dt:.2f} |")


if __name__ == "__main__":
    main()

"""Is ProbeX's lead over the dense expert on a held-out zoo more than noise? A paired test on one zoo.

    python bench/probex_paired.py --zoo /tmp/s38/probex --seeds 10 11 [--children 1000] [--hidden 512]

The zoos are those of ``bench/probex_wide.py`` (cached: built there with the same --zoo, --children, --hidden
and default fine-tuning). On each, ProbeX 128/32/32 and the dense expert (weight decay 1e-3), the fixed
settings of held-out seeds 7-11, are fitted on the 80 % training models and predict every label of every test
model. Both read the same decisions, so they are compared pair by pair:
  * McNemar's exact test on the label decisions exactly one of the two gets right (two-sided binomial,
    p = 0.5); it treats decisions as independent, which labels of one model are not, hence also
  * a bootstrap over test models (2,000 resamples, seeded) of the per-label accuracy difference: 95 % interval.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import importlib.util
from math import comb
from pathlib import Path

import numpy as np
import torch

from modelatlas.allocator import keep_freed_memory
from modelatlas.probex import DenseExpert, ProbeXClassifier, ProbeXConfig
from modelatlas.probex.families import LAYERS

_spec = importlib.util.spec_from_file_location("probex_wide", Path(__file__).with_name("probex_wide.py"))
pw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pw)


FT = {"ft_steps": (30, 60), "ft_lr": (1e-4, 3e-4)}  # probex_wide.py's defaults (the cached zoos' settings)


def mcnemar(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: discordant pairs binomial with p = 0.5. Time O(n)."""
    n, k = a_only + b_only, min(a_only, b_only)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def bootstrap(diff: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean of ``diff`` (one value per test model) over resampled models."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(reps, len(diff)))  # (reps, M)
    means = diff[idx].mean(1)  # (reps,)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def compare(d: dict) -> str:
    """One markdown row: both accuracies, discordant decisions, McNemar p, bootstrap interval."""
    base = ProbeXConfig(epochs=100, seed=0)
    x, y = d["layers"][pw.LAYER], d["y"]
    tr, te = d["train"], d["test"]
    right = {}
    for name, est in (("probex", ProbeXClassifier(pw.rank_config(base, "128/32/32"), pw.LAYER)),
                      ("dense", DenseExpert(ProbeXConfig(**{**base.to_dict(), "weight_decay": 1e-3}), pw.LAYER))):
        right[name] = est.fit(x[tr], y[tr]).predict(x[te]) == y[te]  # (M, C) bool
    p, q = right["probex"], right["dense"]
    a_only, b_only = int((p & ~q).sum()), int((~p & q).sum())
    lo, hi = bootstrap(p.mean(1) - q.mean(1))
    return (f"| {p.mean():.3f} | {q.mean():.3f} | {p.mean() - q.mean():+.4f} | {a_only} / {b_only} | "
            f"{mcnemar(a_only, b_only):.3g} | [{lo:+.4f}, {hi:+.4f}] |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--children", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    names = [f"{n}.{k}" for n in LAYERS for k in ("weight", "bias")]
    print("| zoo | ProbeX 128/32/32 | dense (wd 1e-3) | difference | decisions only ProbeX / only dense got right "
          "| McNemar p | bootstrap 95 % (test models) |\n|---|---|---|---|---|---|---|")
    for s in args.seeds:
        d = pw.load(args.zoo, s, args.children, args.hidden, names, FT)[0]
        print(f"| seed {s} ({len(d['train'])} / {len(d['test'])}) {compare(d)}", flush=True)


if __name__ == "__main__":
    main()

"""Kurtosis of an AWQ model read against its relative (``lineage.unsmoothed``), layer by layer, against its source's;
and the time of the view's variance and moments on one large layer.

    python bench/lineage_awq_moments.py             # both zoos, per layer
    python bench/lineage_awq_moments.py --no-clip-loss  # clipped values left on their levels
    python bench/lineage_awq_moments.py --time 2048 # column_errors on a 2048 x 2048 layer

Zoos: the test zoo of tests/lineage/test_awq_copies.py (:func:`~modelatlas.zoo.awq.llama_model`, ``base -> ft -> c1``, ``ft`` given as AWQ; Gaussian
weights) and seed 0 of bench/lineage_awq_standin.py (``t0`` given as AWQ; heavy-tailed). The view is built as
``recover`` builds it (:func:`~modelatlas.lineage.unsmoothed.unsmoothed`); kurtosis is the distance pass's
(``stream_pair_stats``, exact Grams), its rounding taken out. Printed per layer: source, view, difference, and
the share of its groups read as clipped (:func:`~modelatlas.lineage.unsmoothed.clipped_groups`; above
``MAX_CLIPPED`` the clipped values are taken as the relative's, :func:`~modelatlas.lineage.unsmoothed.clip_loss`).
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lineage_awq_standin import make_zoo

from modelatlas.lineage import unsmoothed as U
from modelatlas.lineage.distances import stream_pair_stats
from modelatlas.lineage.sources import MemoryCheckpoint
from modelatlas.weights import open_checkpoint
from modelatlas.zoo.awq import CONFIG, awq_model, llama_model, save_folder


def zoos(work: Path):
    """(name, relatives, source, AWQ checkpoint) of the two zoos."""
    base = llama_model(0)
    ft = llama_model(1, base, 0.05)
    yield ("test zoo, ft", [MemoryCheckpoint("base", base), MemoryCheckpoint("c1", llama_model(2, ft, 0.05))],
           MemoryCheckpoint("ft", ft), open_checkpoint(save_folder(work / "ft-awq", awq_model(ft), CONFIG)))
    weights, _ = make_zoo(0, 0.005)
    others = [MemoryCheckpoint(n, w) for n, w in weights.items() if n != "t0" and n.startswith("t0")]
    awq = awq_model(weights["t0"], 7, math.log(4))
    yield "standin zoo, t0", others, MemoryCheckpoint("t0", weights["t0"]), open_checkpoint(save_folder(work / "t0", awq, CONFIG))


def per_layer(work: Path) -> None:
    np.set_printoptions(precision=3, suppress=True, linewidth=160)
    for name, others, source, awq in zoos(work):
        layers = [t for t in awq.tensors() if t.name.endswith("_proj.weight")]
        members, _ = U.unsmoothed(others + [awq], layers)
        view = stream_pair_stats(members, layers, gram_sketch=None).layer_kurtosis[-1]
        true = stream_pair_stats(others + [source], layers, gram_sketch=None).layer_kurtosis[-1]
        view_ck = members[-1]
        clipped = [round(U.clipped_groups(view_ck.read(t.name), view_ck.relative.read(t.name),
                                          (12 * view_ck.rounding_variance(t.name).double()).sqrt(),
                                          view_ck.inner.rounding_variance(t.name)), 2) for t in layers]
        print(f"{name}: layers {[t.name.split('.')[-2] for t in layers]}")
        print(f"  source {true}\n  view   {view}\n  diff   {view - true}\n  clipped groups {clipped}")


def timing(n: int) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    chi2 = torch.randn(5, n, n, generator=gen, dtype=torch.float64).square().sum(0) / 5
    w = torch.randn(n, n, generator=gen, dtype=torch.float64) / chi2.sqrt() * 0.02  # Student-t 5
    col = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-1.4, 1.4, generator=gen))  # AWQ's factors
    step = (0.004 * torch.rand(n, n // 32, generator=gen, dtype=torch.float64) + 0.002).repeat_interleave(32, 1) / col
    for moments in (False, True):
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            var, mom = U.column_errors(w, step, moments=moments)
            best = min(best, time.perf_counter() - t)
        print(f"moments={moments}: {best:.2f} s (best of 3, 1 thread); checksum {float(var.sum())!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", type=int, default=0, help="time column_errors on an N x N layer instead")
    ap.add_argument("--no-clip-loss", action="store_true", help="clipped values left on their end levels")
    args = ap.parse_args()
    if args.no_clip_loss:
        U.MAX_CLIPPED = math.inf
    if args.time:
        timing(args.time)
        return
    with tempfile.TemporaryDirectory() as tmp:
        per_layer(Path(tmp))


if __name__ == "__main__":
    main()

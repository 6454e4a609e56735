"""Ground truth for attribution: leave-one-cluster-out (LOO) retraining, and rank agreement.

:func:`loo_attribution` retrains the target model (same init, same full-batch GD) once per cluster without
it: O(K_total x train_steps x N x #params), the cost DDM avoids. :func:`spearman_scores`: Spearman rank
correlation of two attribution matrices, flattened and per test sample (averaged).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from modelatlas.attribution import target as T
from modelatlas.attribution.checkpoint import RunCheckpoint
from modelatlas.attribution.config import DDMConfig
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator


def loo_attribution(x, y, x_test, y_test, num_classes: int, assign: torch.Tensor, config: DDMConfig | None = None,
                    seed: int = 0, progress: Progress | None = None, init_noise: float = 0.0,
                    checkpoint: RunCheckpoint | None = None) -> tuple[torch.Tensor, float]:
    """(A_true (K_total, n_test) = loss_j(retrained without k) - loss_j(full), wall seconds).

    ``init_noise`` > 0 adds seeded Gaussian noise of that std to the initial weights (to measure how sensitive
    the ground truth is to tiny perturbations of training). ``checkpoint``: continue from its saved rows (the
    full model's losses included) and save them as they grow (every ``checkpoint.every_s`` seconds, at the
    end and on Ctrl-C); each cluster's retraining depends only on its index, so a resumed run gives the rows
    of an uninterrupted one, and the wall seconds add up its parts."""
    cfg = config or DDMConfig()
    x, y, x_test, y_test = x.float(), y.long(), x_test.float(), y_test.long()  # the target model's dtypes
    k_total = int(assign.max()) + 1
    model = T.make_model(tuple(x.shape[1:]), num_classes, cfg.width, cfg.depth, derive_seed(seed, "ddm-init"))
    init = T.init_params(model)
    if init_noise > 0:
        gen = torch_generator(derive_seed(seed, "loo-init-noise"))
        init = {k: v + init_noise * torch.randn(v.shape, generator=gen) for k, v in init.items()}
    start = time.perf_counter()
    saved = checkpoint.load_loo(k_total, len(x_test)) if checkpoint is not None else None
    rows, base, before = saved if saved is not None else ([], None, 0.0)
    if base is None:
        full, _ = T.train(model, init, x, y, cfg.train_steps, cfg.lr, weight_decay=cfg.weight_decay)
        with torch.no_grad():
            base = T.losses(model, full, x_test, y_test)

    def retrain(k: int) -> torch.Tensor:
        params, _ = T.train(model, init, x, y, cfg.train_steps, cfg.lr, weights=(assign != k),
                            weight_decay=cfg.weight_decay)
        with torch.no_grad():
            return T.losses(model, params, x_test, y_test) - base

    _fill_rows(rows, k_total, retrain, checkpoint, lambda: before + time.perf_counter() - start, base, progress)
    return torch.stack(rows), before + time.perf_counter() - start


def _fill_rows(rows: list, k_total: int, retrain, checkpoint: RunCheckpoint | None, wall, base: torch.Tensor,
               progress: Progress | None) -> None:
    """Append ``retrain(k)`` for the clusters k not yet in ``rows``, saving to ``checkpoint`` as they come,
    at the end (``force``) and when interrupted (the rows finished so far)."""
    bar = resolve(progress)(range(len(rows), k_total), total=k_total - len(rows), desc="leave-one-cluster-out")
    try:
        for k in bar:
            rows.append(retrain(k))
            if checkpoint is not None:
                checkpoint.save_loo(rows, base, wall(), force=len(rows) == k_total)
    except KeyboardInterrupt:
        if checkpoint is not None:
            checkpoint.save_loo(rows, base, wall(), force=True)
        raise


def spearman_scores(pred: torch.Tensor, true: torch.Tensor) -> dict:
    """{"flattened": rho over all (k, j), "per_test_mean": mean over j of rho over k}."""
    from scipy.stats import spearmanr

    p, t = pred.numpy().astype(np.float64), true.numpy().astype(np.float64)
    flat = float(spearmanr(p.ravel(), t.ravel()).statistic)
    per = [spearmanr(p[:, j], t[:, j]).statistic for j in range(p.shape[1])]
    per = [float(r) for r in per if np.isfinite(r)]
    return {"flattened": flat, "per_test_mean": float(np.mean(per)) if per else float("nan")}


def within_class_spearman(pred: torch.Tensor, true: torch.Tensor, cluster_class: torch.Tensor,
                          y_test: torch.Tensor) -> float:
    """Mean over test samples j of the Spearman rho over the clusters of j's own class only: the ranking left
    once the trivial "a same-class cluster matters" signal is removed. O(n_test x K log K)."""
    from scipy.stats import spearmanr

    p, t = pred.numpy().astype(np.float64), true.numpy().astype(np.float64)
    rhos = []
    for j in range(p.shape[1]):
        rows = (cluster_class == y_test[j]).numpy()
        if rows.sum() >= 3:
            r = spearmanr(p[rows, j], t[rows, j]).statistic
            if np.isfinite(r):
                rhos.append(float(r))
    return float(np.mean(rhos)) if rhos else float("nan")


def validation_scores(pred: torch.Tensor, true: torch.Tensor, cluster_class: torch.Tensor, y_test: torch.Tensor,
                      loo_s: float, timings: dict) -> dict:
    """The ``validation`` object of ``attribution.json``: Spearman scores of ``pred`` against the LOO truth
    (None where undefined, strict JSON having no NaN: ``within_class`` below 3 clusters per class, any of them
    for one cluster and one test sample or a constant matrix), the LOO wall seconds and the speed-ups of DDM
    (``timings``: its ``total_s`` and ``online_s``) over it."""
    scores = {**spearman_scores(pred, true), "within_class": within_class_spearman(pred, true, cluster_class, y_test)}
    return {**{k: v if np.isfinite(v) else None for k, v in scores.items()},
            "loo_wall_s": round(loo_s, 3), "speedup_total": round(loo_s / timings["total_s"], 2),
            "speedup_online": round(loo_s / max(timings["online_s"], 1e-9), 1)}

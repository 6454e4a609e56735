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
from modelatlas.attribution.config import DDMConfig
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator


def loo_attribution(x, y, x_test, y_test, num_classes: int, assign: torch.Tensor, config: DDMConfig | None = None,
                    seed: int = 0, progress: Progress | None = None,
                    init_noise: float = 0.0) -> tuple[torch.Tensor, float]:
    """(A_true (K_total, n_test) = loss_j(retrained without k) - loss_j(full), wall seconds).

    ``init_noise`` > 0 adds seeded Gaussian noise of that std to the initial weights (to measure how sensitive
    the ground truth is to tiny perturbations of training)."""
    cfg = config or DDMConfig()
    x, y, x_test, y_test = x.float(), y.long(), x_test.float(), y_test.long()  # the target model's dtypes
    k_total = int(assign.max()) + 1
    model = T.make_model(tuple(x.shape[1:]), num_classes, cfg.width, cfg.depth, derive_seed(seed, "ddm-init"))
    init = T.init_params(model)
    if init_noise > 0:
        gen = torch_generator(derive_seed(seed, "loo-init-noise"))
        init = {k: v + init_noise * torch.randn(v.shape, generator=gen) for k, v in init.items()}
    start = time.perf_counter()
    full, _ = T.train(model, init, x, y, cfg.train_steps, cfg.lr, weight_decay=cfg.weight_decay)
    with torch.no_grad():
        base = T.losses(model, full, x_test, y_test)
    rows = []
    for k in resolve(progress)(range(k_total), total=k_total, desc="leave-one-cluster-out"):
        params, _ = T.train(model, init, x, y, cfg.train_steps, cfg.lr, weights=(assign != k),
                            weight_decay=cfg.weight_decay)
        with torch.no_grad():
            rows.append(T.losses(model, params, x_test, y_test) - base)
    return torch.stack(rows), time.perf_counter() - start


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

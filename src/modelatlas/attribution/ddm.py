"""DDM: data attribution through a distilled datamodel (Ye et al., CVPR 2024, "Distilled Datamodel with Reverse
Gradient Matching").

Offline (once per target model):
  (1) cluster each class's training data (:func:`~.clusters.cluster_per_class`);
  (2) train the target model on all data, keeping checkpoints theta_1..theta_T (:func:`~.target.train`) and
      the final weights theta_F (``match_final``);
  (3) reverse gradient matching: one synthetic sample (image s_k, soft-label logits l_k) per cluster k,
      learned so that its gradient matches the cluster's mean gradient g_k at every checkpoint:
      min sum_t ||grad CE(s_k, l_k; theta_t) - g_k(theta_t)||^2 / ||g_k(theta_t)||^2 (all clusters and
      checkpoints at once, the MLP's gradients in closed form, :mod:`~.mlp_grads`); with
      ``samples_per_cluster`` m > 1, the mean gradient of the cluster's m samples is matched;
  (3b) ``unlearn="newton"``: Hessian H of the distilled set (samples weighted by cluster size) at theta_F,
      damped and Cholesky-factorised (:mod:`~.newton`).
Online (per query, no retraining, no training data):
  (4) remove cluster k: ``"newton"``: theta_F + n_k / (N - n_k) (H + d I)^{-1} grad CE(s_k, l_k; theta_F)
      (the influence-function / Newton-removal step, an improvement over the paper's plain unlearning);
      ``"ascent"``: ``unlearn_steps`` gradient-ascent steps on (s_k, l_k), step ``unlearn_lr`` x n_k / N;
  (5) A[k, j] = loss_j(unlearned_k) - loss_j(final): positive = cluster k helped test sample j.
Time: offline O(match_steps x T x K x P + T x N x P) (+ O(K x P^2 + P^3) for Newton), P = #params;
online O(K x P^2 + K x n_test x P) (ascent: O(K x (unlearn_steps + n_test) x P)). Memory O(P^2 + N x P).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.func import grad, vmap

from modelatlas.attribution import mlp_grads as G
from modelatlas.attribution import newton as N
from modelatlas.attribution import target as T
from modelatlas.attribution.clusters import cluster_per_class
from modelatlas.attribution.config import DDMConfig
from modelatlas.errors import ConfigError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator


@dataclass
class Attribution:
    """A[k, j] (clusters x test samples) and what produced it."""

    matrix: torch.Tensor  # (K_total, n_test)
    assign: torch.Tensor  # (N,) cluster of each training example
    cluster_class: torch.Tensor  # (K_total,)
    synthetic: torch.Tensor  # (K_total * m, C, H, W) learned samples, m = samples_per_cluster, cluster-major
    synthetic_labels: torch.Tensor  # (K_total * m, num_classes) soft labels
    base_losses: torch.Tensor  # (n_test,) test losses of the final model
    timings: dict = field(default_factory=dict)
    match_losses: list[float] = field(default_factory=list)


def _group_grad_fn(model):
    def group(params, x, t):  # x (m, C, H, W), t (m, K) -> gradient of the group's mean loss
        return grad(lambda p: T.losses(model, p, x, t).mean())(params)
    return group


def cluster_gradients(model, params: T.Params, x, y, assign, num_clusters: int) -> torch.Tensor:
    """(K_total, P): each cluster's mean loss gradient at ``params``, in closed form. The clusters are laid out
    as groups padded to the largest with zero targets (a zero target row backpropagates a zero error), so the
    per-sample (N, P) gradients are never formed (padding costs inputs, O(K_total x largest x D), not
    gradients); when it would hold more than 8 x the data, per-sample gradients are scatter-summed instead."""
    params = G.checked(model, params)
    counts = torch.bincount(assign, minlength=num_clusters)
    width = int(counts.max())
    if num_clusters * width > 8 * len(x):  # very unequal clusters: padding would cost more than it saves
        per = G.sample_gradients(params, x, y)  # (N, P)
        sums = torch.zeros(num_clusters, per.shape[1]).index_add_(0, assign, per)
        return sums / counts.clamp(min=1).unsqueeze(1)  # (K_total, P)
    order = torch.argsort(assign, stable=True)
    starts = torch.cumsum(counts, 0) - counts  # (K_total,)
    slot = torch.arange(len(x)) - starts[assign[order]]  # position of each sorted example in its cluster
    xp = x.new_zeros(num_clusters, width, *x.shape[1:])  # (K_total, width, C, H, W)
    soft = G.soft_targets(params, y[order], x.dtype)  # (N, K)
    tp = x.new_zeros(num_clusters, width, soft.shape[-1])  # (K_total, width, K)
    xp[assign[order], slot] = x[order]
    tp[assign[order], slot] = soft
    return G.group_gradients(params, xp, tp) * (width / counts.clamp(min=1)).unsqueeze(1)  # mean over width -> n_k


def reverse_gradient_match(model, ckpts: list[T.Params], targets: list[torch.Tensor], init_x: torch.Tensor,
                           init_logits: torch.Tensor, steps: int, lr: float,
                           progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Step (3): learn the m synthetic samples of every cluster at once (init_x (K_total, m, C, H, W),
    init_logits (K_total, m, K)): their mean gradient matches the cluster's; returns (images, label logits, loss
    per step)."""
    stacked = G.checked(model, {k: torch.stack([p[k] for p in ckpts]) for k in ckpts[0]})  # each (T, *shape)
    target = torch.stack(targets)  # (T, K_total, P)
    sq = (target ** 2).sum(2)  # (T, K_total)
    norms, blocks = sq.clamp(min=1e-12), G.split_target(stacked, target)

    def objective(xs, logits):  # ||g - target||^2 / ||target||^2, g never formed (closed form, kernel trick)
        return ((G.gradient_distances(stacked, xs, torch.softmax(logits, dim=-1), blocks) + sq) / norms).mean()

    xs, logits = init_x.clone().requires_grad_(True), init_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([xs, logits], lr=lr)
    hist: list[float] = []
    bar = resolve(progress)(range(steps), total=steps, desc="reverse gradient matching")
    for _ in bar:
        loss = objective(xs, logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(float(loss.detach()))
        bar.set_postfix(loss=f"{hist[-1]:.4g}")
    return xs.detach(), logits.detach(), hist


def unlearn(model, final: T.Params, xs: torch.Tensor, soft: torch.Tensor, scales: torch.Tensor,
            steps: int, lr: float) -> T.Params:
    """Step (4) for every cluster at once (xs (K_total, m, C, H, W)): stacked parameters (K_total, ...) after
    gradient ascent on the mean loss of the cluster's synthetic samples."""
    one = _group_grad_fn(model)

    def ascend(x, t, scale):
        p = final
        for _ in range(steps):
            g = one(p, x, t)
            p = {k: p[k] + lr * scale * g[k] for k in p}
        return p
    return vmap(ascend)(xs, soft, scales)


def test_losses_of(model, stacked: T.Params, x_test, y_test) -> torch.Tensor:
    """(K_total, n_test) test losses of stacked parameter sets."""
    return vmap(lambda p: T.losses(model, p, x_test, y_test))(stacked)


def synthetic_gradients(model, params: T.Params, xs: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """(K_total, P) mean loss gradient of every cluster's synthetic samples (xs (K_total, m, C, H, W))."""
    return G.group_gradients(G.checked(model, params), xs, soft)


def initial_samples(x: torch.Tensor, assign: torch.Tensor, k_total: int, m: int, seed: int) -> torch.Tensor:
    """(K_total, m, C, H, W): the cluster's mean image, then m - 1 seeded random members of the cluster."""
    counts = torch.bincount(assign, minlength=k_total).float()
    means = torch.zeros(k_total, *x.shape[1:]).index_add_(0, assign, x) / counts.view(-1, *[1] * (x.dim() - 1))
    if m == 1:
        return means.unsqueeze(1)
    gen = torch_generator(derive_seed(seed, "ddm-synthetic-init"))
    members = [torch.nonzero(assign == k).flatten() for k in range(k_total)]
    picks = [mem[torch.randint(len(mem), (m - 1,), generator=gen)] for mem in members]
    return torch.cat([means.unsqueeze(1), x[torch.stack(picks)]], dim=1)  # x[(K_total, m-1)] -> (K_total, m-1, ...)


def _offline(model, x, y, assign, k_total, num_classes, cluster_class, cfg, seed, progress):
    """Steps (2)-(3) (+ the distilled-set Hessian factor for Newton unlearning); returns a dict of results."""
    clock = [time.perf_counter()]
    final, ckpts = T.train(model, T.init_params(model), x, y, cfg.train_steps, cfg.lr, checkpoints=cfg.checkpoints,
                           weight_decay=cfg.weight_decay)
    match_at = ckpts + [final] if cfg.match_final else ckpts
    clock.append(time.perf_counter())
    targets = [cluster_gradients(model, p, x, y, assign, k_total) for p in match_at]
    counts = torch.bincount(assign, minlength=k_total).float()
    init_x = initial_samples(x, assign, k_total, cfg.samples_per_cluster, seed)  # (K_total, m, C, H, W)
    init_logits = torch.nn.functional.one_hot(cluster_class, num_classes).float() * 5.0  # (K_total, K)
    init_logits = init_logits.unsqueeze(1).expand(-1, cfg.samples_per_cluster, -1)  # (K_total, m, K)
    xs, logits, hist = reverse_gradient_match(model, match_at, targets, init_x, init_logits, cfg.match_steps,
                                              cfg.match_lr, progress)
    soft = torch.softmax(logits, dim=-1)
    clock.append(time.perf_counter())
    factor, damping = None, None
    if cfg.unlearn == "newton":
        m = cfg.samples_per_cluster
        hess = N.distilled_hessian(model, final, xs.flatten(0, 1), soft.flatten(0, 1), counts.repeat_interleave(m))
        hess.diagonal().add_(cfg.weight_decay)  # + w I: the L2 penalty's curvature
        factor, damping = N.damped_cholesky(hess, cfg.damping)
    clock.append(time.perf_counter())
    times = {"train_target_s": clock[1] - clock[0], "offline_match_s": clock[2] - clock[1],
             "offline_hessian_s": clock[3] - clock[2]}
    return {"final": final, "xs": xs, "soft": soft, "hist": hist, "counts": counts, "factor": factor,
            "damping": damping, "times": times}


def _online(model, off: dict, n_train: int, x_test, y_test, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps (4)-(5): (A (K_total, n_test), base test losses (n_test,))."""
    final, xs, soft, counts = off["final"], off["xs"], off["soft"], off["counts"]
    with torch.no_grad():
        if cfg.unlearn == "newton":
            grads = synthetic_gradients(model, final, xs, soft) + cfg.weight_decay * N.flatten(final)  # (K_total, P)
            stacked = N.stacked_params(final, N.newton_steps(off["factor"], grads, counts / (n_train - counts)))
        else:
            stacked = unlearn(model, final, xs, soft, counts / n_train, cfg.unlearn_steps, cfg.unlearn_lr)
        base = T.losses(model, final, x_test, y_test)
        return test_losses_of(model, stacked, x_test, y_test) - base, base  # (K_total, n_test)


def ddm_attribution(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                    num_classes: int, config: DDMConfig | None = None, seed: int = 0,
                    progress: Progress | None = None) -> Attribution:
    """Steps (1)-(5): the cluster x test-sample attribution matrix of the target model trained on (x, y)."""
    cfg = config or DDMConfig()
    x, y, x_test, y_test = _as_inputs(x, y, x_test, y_test, num_classes)
    n_synthetic = num_classes * cfg.clusters_per_class * cfg.samples_per_cluster
    if n_synthetic > len(x):  # 10^9 per cluster ran out of memory in the offline phase, with a traceback
        raise ConfigError(f"samples_per_cluster={cfg.samples_per_cluster} x {num_classes * cfg.clusters_per_class} "
                          f"clusters = {n_synthetic:,} synthetic samples, more than the {len(x):,} training examples "
                          "they distil; lower clusters_per_class or samples_per_cluster (--clusters-per-class, "
                          "--samples-per-cluster), or use more training examples (--max-train)")
    _preload_optimizer()
    t0 = time.perf_counter()
    assign, cluster_class = cluster_per_class(x, y, num_classes, cfg.clusters_per_class, seed)
    k_total = len(cluster_class)
    if k_total == 1 and cfg.unlearn == "newton":  # n_k / (N - n_k) = 1 / 0: every number would be NaN
        raise ConfigError("clusters_per_class: one class with 1 cluster puts all the training data in one cluster, "
                          "whose removal leaves nothing to train on; use clusters_per_class >= 2")
    model = T.make_model(tuple(x.shape[1:]), num_classes, cfg.width, cfg.depth, derive_seed(seed, "ddm-init"))
    _check_hessian_fits(model, cfg)
    t1 = time.perf_counter()
    off = _offline(model, x, y, assign, k_total, num_classes, cluster_class, cfg, seed, progress)
    t2 = time.perf_counter()
    matrix, base = _online(model, off, len(x), x_test, y_test, cfg)
    t3 = time.perf_counter()
    clock = {"cluster_s": t1 - t0, **off["times"], "online_s": t3 - t2, "total_s": t3 - t0,
             "total_after_clustering_s": t3 - t1}
    timings = {k: round(v, 4) for k, v in clock.items()}
    if off["damping"] is not None:
        timings["damping_used"] = off["damping"]
    return Attribution(matrix, assign, cluster_class, off["xs"].flatten(0, 1), off["soft"].flatten(0, 1), base,
                       timings, off["hist"])


def _preload_optimizer() -> None:
    """The first ``torch.optim.Adam`` of a process imports ``torch._dynamo`` (1.3 s measured, torch 2.13 CPU),
    six times DDM's whole offline phase on digits. Paid here, before the clock, so that ``timings`` (and the
    speed-ups computed from them) measure DDM rather than a one-off import; the bench warmed up for the same
    reason, the CLI did not and printed 2x where the bench measured 11x."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


MAX_NEWTON_PARAMS = 20_000  # the exact (P, P) float32 Hessian and its Cholesky factor: ~3.2 GB at this P


def _check_hessian_fits(model: torch.nn.Module, cfg: DDMConfig) -> None:
    """Newton's exact Hessian is O(P^2) memory and O(P^3) time: refuse a target too large for it up front,
    rather than run out of memory after the offline training."""
    p = sum(t.numel() for t in model.parameters())
    if cfg.unlearn == "newton" and p > MAX_NEWTON_PARAMS:
        raise ConfigError(f"unlearn='newton' needs the exact {p:,} x {p:,} Hessian of the target model (more than "
                          f"{MAX_NEWTON_PARAMS:,} parameters); use unlearn='ascent' (--unlearn ascent), a smaller "
                          "width, or smaller inputs")


def _as_inputs(x, y, x_test, y_test, num_classes: int):
    """Images as float32 and labels as int64, the target model's dtypes: data from NumPy arrives as float64
    (a "Double and Float" error deep in training) and labels may be int32 (cross-entropy needs int64).
    Labels outside [0, num_classes) are refused here, not as torch's "Target 2 is out of bounds"."""
    for name, lab in (("y", y), ("y_test", y_test)):
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ConfigError(f"{name} holds labels from {int(lab.min())} to {int(lab.max())}, outside "
                              f"0..{num_classes - 1} for num_classes={num_classes}")
    return x.float(), y.long(), x_test.float(), y_test.long()

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
      ``samples_per_cluster`` m > 1, the mean gradient of the cluster's m samples is matched (:mod:`~.matching`);
  (3b) ``unlearn="newton"`` (``"auto"``, the default: where the target model has at most
      ``MAX_NEWTON_PARAMS`` parameters, else ``"cg"``, :func:`unlearn_choice`): Hessian H of the distilled set (samples weighted by cluster size) at theta_F,
      damped and Cholesky-factorised (:mod:`~.newton`); ``"cg"``: H is not formed, only the graph of the
      distilled set's gradient for Hessian-vector products and a Lanczos estimate of H's smallest eigenvalue
      for the damping (:mod:`~.cg`).
Online (per query, no retraining, no training data):
  (4) remove cluster k: ``"newton"``: theta_F + n_k / (N - n_k) (H + d I)^{-1} grad CE(s_k, l_k; theta_F)
      (the influence-function / Newton-removal step, an improvement over the paper's plain unlearning);
      ``"cg"``: the same step, solved by batched conjugate gradients on Hessian-vector products;
      ``"ascent"``: ``unlearn_steps`` gradient-ascent steps on (s_k, l_k), step ``unlearn_lr`` x n_k / N;
  (5) A[k, j] = loss_j(unlearned_k) - loss_j(final): positive = cluster k helped test sample j.
Steps (1), (2) and (3) are the units an interrupted run keeps and a resume continues from (:mod:`~.units`).
Time: offline O(match_steps x T x K x P + T x N x P) (+ O(K x P^2 + P^3) for Newton), P = #params;
online O(K x P^2 + K x n_test x P) (ascent: O(K x (unlearn_steps + n_test) x P); cg: offline O(L x n_syn x P),
online O(I x K x n_syn x P + K x n_test x P) for L Lanczos steps and I CG iterations, n_syn synthetic samples).
Memory O(P^2 + N x P) (ascent and cg: O(N x P + K x P)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch.func import grad, vmap

from modelatlas.attribution import cg as CG
from modelatlas.attribution import mlp_grads as G
from modelatlas.attribution import newton as N
from modelatlas.attribution import target as T
from modelatlas.attribution import units as U
from modelatlas.attribution.clusters import cluster_per_class
from modelatlas.attribution.config import DDMConfig
from modelatlas.attribution.matching import cluster_gradients, initial_samples, reverse_gradient_match
from modelatlas.errors import ConfigError
from modelatlas.progress import Progress
from modelatlas.seeding import derive_seed


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


@dataclass
class _Run:
    """What the offline steps share: the target model, the training data and its clusters, the settings, and
    the store of the units kept (:mod:`~.units`)."""

    model: torch.nn.Module
    num_classes: int
    x: torch.Tensor
    y: torch.Tensor
    assign: torch.Tensor
    cluster_class: torch.Tensor
    cfg: DDMConfig
    seed: int
    progress: Progress | None
    store: U.UnitStore

    @property
    def k_total(self) -> int:
        return len(self.cluster_class)


def _clustered(x, y, num_classes: int, cfg: DDMConfig, seed: int, store: U.UnitStore,
               progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Step (1), or the ``clusters`` an interrupted run kept: (assign (N,), cluster_class (K_total,), seconds)."""
    shapes = {"assign": (len(x),), "cluster_class": (num_classes * cfg.clusters_per_class,), "seconds": ()}
    if (kept := store.load("clusters", shapes)) is not None:
        return kept["assign"], kept["cluster_class"], float(kept["seconds"])
    start = time.perf_counter()
    assign, cluster_class = cluster_per_class(x, y, num_classes, cfg.clusters_per_class, seed, progress)
    took = time.perf_counter() - start
    store.save("clusters", {"assign": assign, "cluster_class": cluster_class, "seconds": U.seconds(took)})
    return assign, cluster_class, took


def _trained(run: _Run) -> tuple[T.Params, list[T.Params], float]:
    """Step (2), or the ``target`` an interrupted run kept: (final weights, checkpoints, seconds)."""
    cfg, init = run.cfg, T.init_params(run.model)
    names, count = list(init), len(T.checkpoint_steps(cfg.train_steps, cfg.checkpoints))
    shapes = {**U.param_shapes("final", init), "seconds": ()}
    for i in range(count):
        shapes.update(U.param_shapes(f"ckpt{i}", init))
    if (kept := run.store.load("target", shapes)) is not None:
        ckpts = [U.unpack_params(f"ckpt{i}", kept, names) for i in range(count)]
        return U.unpack_params("final", kept, names), ckpts, float(kept["seconds"])
    start = time.perf_counter()
    final, ckpts = T.train(run.model, init, run.x, run.y, cfg.train_steps, cfg.lr, checkpoints=cfg.checkpoints,
                           weight_decay=cfg.weight_decay, progress=run.progress)
    took = time.perf_counter() - start
    packed = {**U.pack_params("final", final), "seconds": U.seconds(took)}
    for i, params in enumerate(ckpts):
        packed.update(U.pack_params(f"ckpt{i}", params))
    run.store.save("target", packed)
    return final, ckpts, took


def _matched(run: _Run, match_at: list[T.Params]) -> tuple[torch.Tensor, torch.Tensor, list[float], float]:
    """Step (3), continued from the ``match`` state an interrupted run kept (saved when the store is due, at the
    end and on Ctrl-C): (images, label logits, loss per step, seconds of all the parts)."""
    start, cfg = time.perf_counter(), run.cfg
    init_x = initial_samples(run.x, run.assign, run.k_total, cfg.samples_per_cluster, run.seed)  # (K_total, m, C, H, W)
    init_logits = torch.nn.functional.one_hot(run.cluster_class, run.num_classes).float() * 5.0  # (K_total, K)
    init_logits = init_logits.unsqueeze(1).expand(-1, cfg.samples_per_cluster, -1)  # (K_total, m, K)
    shapes = {"xs": tuple(init_x.shape), "logits": tuple(init_logits.shape), "hist": None, "seconds": (),
              **U.adam_shapes([init_x, init_logits])}
    kept = run.store.load("match", shapes)
    before = float(kept["seconds"]) if kept is not None else 0.0
    if kept is not None and len(kept["hist"]) == cfg.match_steps:  # it had finished
        return kept["xs"], kept["logits"], kept["hist"].tolist(), before

    def save(state, force: bool) -> None:
        if force or run.store.due():
            now = {**state(), "seconds": U.seconds(before + time.perf_counter() - start)}
            run.store.save("match", now, (len(now["hist"]), cfg.match_steps))
    targets = [cluster_gradients(run.model, p, run.x, run.y, run.assign, run.k_total) for p in match_at]
    xs, logits, hist = reverse_gradient_match(run.model, match_at, targets, init_x, init_logits, cfg.match_steps,
                                              cfg.match_lr, run.progress, kept, save)
    return xs, logits, hist, before + time.perf_counter() - start


def _hessian_factor(run: _Run, final: T.Params, xs: torch.Tensor, soft: torch.Tensor, counts: torch.Tensor):
    """Step (3b): (Cholesky factor, damping used) of the distilled set's damped Hessian at the final weights."""
    m = run.cfg.samples_per_cluster
    hess = N.distilled_hessian(run.model, final, xs.flatten(0, 1), soft.flatten(0, 1), counts.repeat_interleave(m))
    hess.diagonal().add_(run.cfg.weight_decay)  # + w I: the L2 penalty's curvature
    return N.damped_cholesky(hess, run.cfg.damping)


def _curvature(run: _Run, final: T.Params, xs: torch.Tensor, soft: torch.Tensor, counts: torch.Tensor) -> dict:
    """Step (3b): {"factor": Cholesky factor} (``"newton"``) or {"hvp": V -> V (H + weight_decay I)} (``"cg"``),
    with the damping ({"damping": None} for ascent)."""
    cfg, m = run.cfg, run.cfg.samples_per_cluster
    if cfg.unlearn == "newton":
        factor, damping = _hessian_factor(run, final, xs, soft, counts)
        return {"factor": factor, "damping": damping}
    if cfg.unlearn == "cg":
        hvp, damping = CG.prepare(run.model, final, xs.flatten(0, 1), soft.flatten(0, 1), counts.repeat_interleave(m),
                                  cfg.weight_decay, cfg.damping, derive_seed(run.seed, "cg-lanczos"))
        return {"hvp": hvp, "damping": damping}
    return {"damping": None}


def _offline(run: _Run) -> dict:
    """Steps (2)-(3) (+ the distilled-set Hessian factor for Newton unlearning); returns a dict of results."""
    final, ckpts, train_s = _trained(run)
    with torch.no_grad():  # O(N P), one pass: a diverged target gave ascent an all-NaN matrix, with exit code 0
        diverged = not bool(torch.isfinite(T.losses(run.model, final, run.x, run.y)).all())
    if diverged:
        raise ConfigError(f"DDM: the target model diverged (NaN/inf losses after {run.cfg.train_steps} steps); lower "
                          "its learning rate, train_steps or weight_decay (--train-steps, --weight-decay)")
    match_at = ckpts + [final] if run.cfg.match_final else ckpts
    xs, logits, hist, match_s = _matched(run, match_at)
    soft = torch.softmax(logits, dim=-1)
    counts = torch.bincount(run.assign, minlength=run.k_total).float()
    start = time.perf_counter()
    curvature = _curvature(run, final, xs, soft, counts)
    times = {"train_target_s": train_s, "offline_match_s": match_s, "offline_hessian_s": time.perf_counter() - start}
    return {"final": final, "xs": xs, "soft": soft, "hist": hist, "counts": counts, "times": times, **curvature}


def _online(model, off: dict, n_train: int, x_test, y_test, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps (4)-(5): (A (K_total, n_test), base test losses (n_test,))."""
    final, xs, soft, counts = off["final"], off["xs"], off["soft"], off["counts"]
    with torch.no_grad():
        if cfg.unlearn in ("newton", "cg"):
            grads = synthetic_gradients(model, final, xs, soft) + cfg.weight_decay * N.flatten(final)  # (K_total, P)
            stacked = N.stacked_params(final, _newton_steps(off, grads, counts / (n_train - counts), cfg))
        else:
            stacked = unlearn(model, final, xs, soft, counts / n_train, cfg.unlearn_steps, cfg.unlearn_lr)
        base = T.losses(model, final, x_test, y_test)
        return test_losses_of(model, stacked, x_test, y_test) - base, base  # (K_total, n_test)


def _newton_steps(off: dict, grads: torch.Tensor, shares: torch.Tensor, cfg: DDMConfig) -> torch.Tensor:
    """(K_total, P) Newton removal steps: two triangular solves each (``"newton"``), or one batched CG (``"cg"``),
    whose damping (doubled if CG met negative curvature) and convergence go into ``off`` for the timings."""
    if "factor" in off:
        return N.newton_steps(off["factor"], grads, shares)
    s = CG.solve(off["hvp"], grads * shares[:, None], off["damping"], cfg.cg_iterations, cfg.cg_tolerance)
    off["damping"] = s.damping
    off["cg"] = {"cg_iterations": s.iterations, "cg_relative_residual": s.residual, "cg_converged": s.converged}
    return s.x


def ddm_attribution(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                    num_classes: int, config: DDMConfig | None = None, seed: int = 0,
                    progress: Progress | None = None, checkpoint: U.UnitStore | None = None) -> Attribution:
    """Steps (1)-(5): the cluster x test-sample attribution matrix of the target model trained on (x, y).

    ``checkpoint`` (a :class:`~.units.UnitStore`, e.g. :class:`~.checkpoint.RunCheckpoint`): keep there each
    finished unit of the offline phase (the clusters, the target model, the matching as it goes) and continue
    from those it holds; the tensors are then those of an uninterrupted run, and the timings add up the parts.
    ``config.unlearn="auto"`` runs the step :func:`unlearn_choice` picks for this target model."""
    cfg = config or DDMConfig()
    x, y, x_test, y_test = _as_inputs(x, y, x_test, y_test, num_classes)
    cfg = replace(cfg, unlearn=unlearn_choice(cfg, tuple(x.shape[1:]), num_classes)[0])  # "auto" resolved
    _check_sizes(cfg, num_classes, len(x))
    _preload_optimizer()
    start = time.perf_counter()  # before clustering: a refused model keeps no unit
    model = T.make_model(tuple(x.shape[1:]), num_classes, cfg.width, cfg.depth, derive_seed(seed, "ddm-init"))
    setup_s = time.perf_counter() - start
    store = checkpoint if checkpoint is not None else U.NOWHERE
    assign, cluster_class, cluster_s = _clustered(x, y, num_classes, cfg, seed, store, progress)
    off = _offline(_Run(model, num_classes, x, y, assign, cluster_class, cfg, seed, progress, store))
    start = time.perf_counter()
    matrix, base = _online(model, off, len(x), x_test, y_test, cfg)
    timings = _timings(cluster_s, setup_s, off, time.perf_counter() - start)
    return Attribution(matrix, assign, cluster_class, off["xs"].flatten(0, 1), off["soft"].flatten(0, 1), base,
                       timings, off["hist"])


def _timings(cluster_s: float, setup_s: float, off: dict, online_s: float) -> dict:
    """Seconds of each step (a unit kept by an interrupted run: its own), rounded; the totals add them up."""
    after = setup_s + sum(off["times"].values()) + online_s
    clock = {"cluster_s": cluster_s, **off["times"], "online_s": online_s, "total_s": cluster_s + after,
             "total_after_clustering_s": after}
    timings = {k: round(v, 4) for k, v in clock.items()}
    if off["damping"] is not None:
        timings["damping_used"] = off["damping"]
    return {**timings, **off.get("cg", {})}


def _check_sizes(cfg: DDMConfig, num_classes: int, n_train: int) -> None:
    """Refuse, before any work, more synthetic samples than training examples, and a single cluster."""
    n_synthetic = num_classes * cfg.clusters_per_class * cfg.samples_per_cluster
    if n_synthetic > n_train:  # 10^9 per cluster ran out of memory in the offline phase, with a traceback
        raise ConfigError(f"samples_per_cluster={cfg.samples_per_cluster} x {num_classes * cfg.clusters_per_class} "
                          f"clusters = {n_synthetic:,} synthetic samples, more than the {n_train:,} training examples "
                          "they distil; lower clusters_per_class or samples_per_cluster (--clusters-per-class, "
                          "--samples-per-cluster), or use more training examples (--max-train)")
    if num_classes * cfg.clusters_per_class == 1 and cfg.unlearn in ("newton", "cg"):  # n_k / (N - n_k) = 1 / 0: all NaN
        raise ConfigError("clusters_per_class: one class with 1 cluster puts all the training data in one cluster, "
                          "whose removal leaves nothing to train on; use clusters_per_class >= 2")


def _preload_optimizer() -> None:
    """The first ``torch.optim.Adam`` of a process imports ``torch._dynamo`` (1.3 s measured, torch 2.13 CPU),
    six times DDM's whole offline phase on digits. Paid here, before the clock, so that ``timings`` (and the
    speed-ups computed from them) measure DDM rather than a one-off import; the bench warmed up for the same
    reason, the CLI did not and printed 2x where the bench measured 11x."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


MAX_NEWTON_PARAMS = 20_000  # the exact (P, P) float32 Hessian and its Cholesky factor: ~3.2 GB at this P


def unlearn_choice(cfg: DDMConfig, in_shape: tuple[int, ...], num_classes: int) -> tuple[str, str]:
    """(the online step that runs, why): ``cfg.unlearn`` as given, or for ``"auto"`` Newton where its exact
    Hessian fits (a target of at most :data:`MAX_NEWTON_PARAMS` parameters) and otherwise the same Newton step
    by conjugate gradients on Hessian-vector products (``"cg"``, no P x P matrix).
    Newton's exact Hessian is O(P^2) memory and O(P^3) time: an explicit ``"newton"`` on a target too large for
    it is refused here, up front, rather than running out of memory after the offline training. O(1)."""
    p = T.n_params(tuple(in_shape), num_classes, cfg.width, cfg.depth)
    if cfg.unlearn == "newton" and p > MAX_NEWTON_PARAMS:
        raise ConfigError(f"unlearn='newton' needs the exact {p:,} x {p:,} Hessian of the target model (more than "
                          f"{MAX_NEWTON_PARAMS:,} parameters); use unlearn='cg' (the same step by conjugate "
                          "gradients, without the Hessian), or unlearn='auto' (the default), which takes it for such "
                          "a model")
    if cfg.unlearn != "auto":
        return cfg.unlearn, "as given"
    if p <= MAX_NEWTON_PARAMS:
        return "newton", f"auto: the target model's {p:,} parameters fit Newton's exact Hessian, at most {MAX_NEWTON_PARAMS:,}"
    return "cg", (f"auto: the target model's {p:,} parameters are over the {MAX_NEWTON_PARAMS:,} of Newton's exact "
                  "Hessian: the Newton step by conjugate gradients on Hessian-vector products")


def _as_inputs(x, y, x_test, y_test, num_classes: int):
    """Images as float32 and labels as int64, the target model's dtypes: data from NumPy arrives as float64
    (a "Double and Float" error deep in training) and labels may be int32 (cross-entropy needs int64).
    Labels outside [0, num_classes) are refused here, not as torch's "Target 2 is out of bounds"."""
    for name, lab in (("y", y), ("y_test", y_test)):
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ConfigError(f"{name} holds labels from {int(lab.min())} to {int(lab.max())}, outside "
                              f"0..{num_classes - 1} for num_classes={num_classes}")
    return x.float(), y.long(), x_test.float(), y_test.long()

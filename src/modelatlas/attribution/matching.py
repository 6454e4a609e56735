"""Step (3) of DDM, reverse gradient matching: each cluster's mean loss gradient at the target model's checkpoints
(:func:`cluster_gradients`), the synthetic samples' starting point (:func:`initial_samples`) and their learning
(:func:`reverse_gradient_match`), which an interrupted run continues from its saved state. The MLP's gradients
are in closed form (:mod:`~.mlp_grads`). Time O(steps x T x K x P) for the matching, O(T x N x P) for the targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from modelatlas.attribution import mlp_grads as G
from modelatlas.attribution import target as T
from modelatlas.attribution import units as U
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator


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
                           init_logits: torch.Tensor, steps: int, lr: float, progress: Progress | None = None,
                           kept: dict | None = None,
                           save: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Step (3): learn the m synthetic samples of every cluster at once (init_x (K_total, m, C, H, W),
    init_logits (K_total, m, K)): their mean gradient matches the cluster's; returns (images, label logits, loss
    per step).

    ``kept``: the state an interrupted run saved after its step s (``xs``, ``logits``, Adam's state, the losses
    ``hist``): the matching goes on from step s + 1 and ends where an uninterrupted one does, bit for bit.
    ``save(state, force)`` is called after every step, and with ``force`` at the end and on Ctrl-C; ``state()``
    gives that state (images, logits, Adam's, losses) to save, a resume passes it back as ``kept``."""
    stacked = G.checked(model, {k: torch.stack([p[k] for p in ckpts]) for k in ckpts[0]})  # each (T, *shape)
    target = torch.stack(targets)  # (T, K_total, P)
    sq = (target ** 2).sum(2)  # (T, K_total)
    norms, blocks = sq.clamp(min=1e-12), G.split_target(stacked, target)

    def objective(xs, logits):  # ||g - target||^2 / ||target||^2, g never formed (closed form, kernel trick)
        return ((G.gradient_distances(stacked, xs, torch.softmax(logits, dim=-1), blocks) + sq) / norms).mean()

    start = kept if kept is not None else {"xs": init_x, "logits": init_logits}
    xs, logits = start["xs"].clone().requires_grad_(True), start["logits"].clone().requires_grad_(True)
    opt = torch.optim.Adam([xs, logits], lr=lr)
    hist: list[float] = []
    if kept is not None:
        U.restore_adam(opt, kept)
        hist = kept["hist"].tolist()
    _match_steps(objective, opt, hist, steps, progress, save)
    return xs.detach(), logits.detach(), hist


def _match_steps(objective, opt: torch.optim.Adam, hist: list[float], steps: int, progress: Progress | None,
                 save: Callable | None) -> None:
    """Adam steps on ``objective`` until ``hist`` holds ``steps`` losses, saved as in reverse_gradient_match
    (never before the first step: there is nothing to keep)."""
    xs, logits = opt.param_groups[0]["params"]

    def state() -> dict:
        return {"xs": xs.detach(), "logits": logits.detach(), "hist": torch.tensor(hist, dtype=torch.float64),
                **U.adam_tensors(opt)}

    def keep(force: bool) -> None:
        if save is not None and hist:
            save(state, force)
    bar = resolve(progress)(range(len(hist), steps), total=steps - len(hist), desc="reverse gradient matching")
    stepping = False
    try:
        for _ in bar:
            loss = objective(xs, logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            stepping = True  # a Ctrl-C from here to the append would find the images half updated: not saved
            opt.step()
            hist.append(float(loss.detach()))
            stepping = False
            bar.set_postfix(loss=f"{hist[-1]:.4g}")
            keep(False)
    except KeyboardInterrupt:
        if not stepping:
            keep(True)
        raise
    keep(True)


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

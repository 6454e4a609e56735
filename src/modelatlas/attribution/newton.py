"""Newton unlearning on the distilled set: DDM's online step with curvature.

Removing cluster k (n_k of N examples) from a model at a stationary point theta of the mean training loss moves
the optimum, to first order in the removed share, by the influence-function / Newton-removal step (Koh & Liang
2017; Guo et al. 2020, "certified removal")::

    delta_k = n_k / (N - n_k) * H^{-1} g_k

with g_k the cluster's mean loss gradient and H the Hessian of the mean training loss at theta. DDM supplies
both from the distilled set: g_k is the gradient of cluster k's synthetic sample (matched to the real one by
reverse gradient matching) and H is the Hessian of the distilled set (every synthetic sample weighted by its
cluster size), so the online step never touches the training data. The Hessian is damped (H + d I with d
doubled from ``damping`` until the Cholesky factorisation succeeds: ReLU networks away from a minimum have
small negative eigenvalues) and factorised once per model; every removal is then two triangular solves.

Cost: Hessian O(P x K x P) (P Hessian-vector products over the K synthetic samples), Cholesky O(P^3) once,
then O(K x P^2) for all removals; memory O(P^2). Meant for models with up to ~10^4 parameters (the digits MLP
has 2,410); larger models would need a low-rank or Kronecker-factored H (not implemented).
"""

from __future__ import annotations

import torch
from torch.func import jacrev

from modelatlas.attribution import target as T
from modelatlas.errors import ConfigError


def flatten(params: T.Params) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])  # (P,)


def unflattener(params: T.Params):
    """A function (P,) -> parameter dict with the names and shapes of ``params``."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def unflat(u: torch.Tensor) -> T.Params:
        return {n: c.reshape(s) for n, c, s in zip(names, torch.split(u, sizes), shapes)}
    return unflat


def distilled_hessian(model, params: T.Params, xs: torch.Tensor, soft: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """(P, P) Hessian of sum_k weights_k CE(xs_k, soft_k) / sum weights at ``params`` (exact, autograd)."""
    unflat = unflattener(params)
    w = weights / weights.sum()

    def loss(u):
        return (T.losses(model, unflat(u), xs, soft) * w).sum()
    return jacrev(jacrev(loss))(flatten(params)).detach()  # reverse-over-reverse: fastest here


def damped_cholesky(h: torch.Tensor, damping: float, max_tries: int = 40) -> tuple[torch.Tensor, float]:
    """(lower Cholesky factor of h + d I, d): d starts at ``damping`` and doubles until h + d I is positive
    definite. O(P^3) per try. A non-finite Hessian (a diverged target model) is refused at once. The damping
    goes onto h's diagonal in place, and h is restored before returning (a damped copy, 4 P^2 bytes written
    per try, cost a fifth of a factorisation at P = 2,410)."""
    if not bool(torch.isfinite(h.sum(1)).all()):  # NaN/inf propagate into the row sums: one pass, not four
        raise ConfigError("DDM: the distilled-set Hessian has NaN/inf entries (the target model diverged?); "
                          "lower its learning rate, train_steps or weight_decay (--train-steps, --weight-decay)")
    diag = h.diagonal()
    base = diag.clone()  # (P,)
    d = float(damping)
    try:
        for _ in range(max_tries):
            torch.add(base, d, out=diag)  # h + d I, bit for bit: off the diagonal h + d * 0 = h
            factor, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                return factor, d
            d *= 2.0
    finally:
        diag.copy_(base)
    raise ConfigError(f"DDM: the distilled-set Hessian is not positive definite even with damping {d:g}; raise the damping (--damping, DDMConfig.damping)")


def newton_steps(factor: torch.Tensor, grads: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """(K, P) removal steps shares_k x (H + d I)^{-1} grads_k, from the Cholesky factor of the damped H.
    With an L2 penalty w/2 ||theta||^2 pass H + w I and grads_k + w theta (the penalty's weight grows relative
    to the data term when n_k examples leave the mean)."""
    return torch.cholesky_solve(grads.T * shares, factor).T  # (P, K) -> (K, P)


def stacked_params(final: T.Params, steps: torch.Tensor) -> T.Params:
    """Parameter dicts with a leading K axis: final + steps_k (for ``vmap`` over the removals)."""
    unflat = unflattener(final)
    theta = flatten(final)
    return torch.vmap(unflat)(theta.unsqueeze(0) + steps)  # each value (K, *shape)

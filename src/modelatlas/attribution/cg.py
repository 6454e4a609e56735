"""Newton unlearning without the Hessian: conjugate gradients on Hessian-vector products (``unlearn="cg"``).

The Newton removal step of :mod:`~.newton` solves (H + d I) x_k = s_k g_k for every cluster k, with H the
Hessian of the size-weighted distilled set at the final weights. :mod:`~.newton` forms H (P x P) and factorises
it, which is O(P^2) memory and O(P^3) time. Here H is never formed: the gradient of the same loss is built once
with its graph kept (``create_graph``), and each Hessian-vector product is one more backward through it
(double backward), batched over a block of vectors (``is_grads_batched``: one vmapped backward per block).

- The damping d follows the rule of :func:`~.newton.damped_cholesky` (``damping`` doubled until H + d I is
  positive definite) with the smallest eigenvalue of H estimated by Lanczos (:func:`smallest_eigenvalue`, full
  reorthogonalisation, exact once its steps reach P). A Ritz value can lie above the true smallest eigenvalue,
  so conjugate gradients also watch the curvature: p^T (H + d I) p <= 0 on any search direction doubles d and
  starts the solve again (:func:`solve`).
- The K systems (one per cluster) run as one batched CG: each column keeps its own step sizes (independent
  CGs, vectorised), and a column stops moving once its relative residual ||b - A x|| / ||b|| reaches the
  tolerance.

Cost: an HVP block costs about two gradient evaluations of the distilled set per vector, O(n_syn x P) each
(n_syn synthetic samples); Lanczos O(L x n_syn x P + L^2 x P) for L steps; CG O(I x K x n_syn x P) for I
iterations (I <= ``cg_iterations``; in exact arithmetic at most the number of distinct eigenvalues of H + d I,
in practice ~sqrt(condition number) x log(1 / tolerance)). Memory O(K x P) for the CG vectors plus the graph
of one gradient, O(n_syn x P); no P x P matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modelatlas.attribution import newton as N
from modelatlas.attribution import target as T
from modelatlas.errors import ConfigError
from modelatlas.seeding import torch_generator

LANCZOS_STEPS = 60  # Lanczos steps for the smallest eigenvalue (all P of them where P is smaller)
MAX_DOUBLINGS = 40  # as damped_cholesky's max_tries


def hvp_operator(model, params: T.Params, xs: torch.Tensor, soft: torch.Tensor, weights: torch.Tensor,
                 shift: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function V (B, P) -> V (H + shift I) (B, P), H the Hessian of sum_k weights_k CE(xs_k, soft_k) /
    sum weights at ``params`` (the loss of :func:`~.newton.distilled_hessian`; H is symmetric, so rows work).
    The gradient's graph is built here once, O(n_syn x P); each call is one batched backward, O(B x n_syn x P)."""
    unflat, w = N.unflattener(params), weights / weights.sum()
    theta = N.flatten(params).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = (T.losses(model, unflat(theta), xs, soft) * w).sum()
        g = torch.autograd.grad(loss, theta, create_graph=True)[0]  # (P,)

    def apply(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(g, theta, v, retain_graph=True, is_grads_batched=True)[0]  # (B, P)
        return hv.detach() + shift * v
    return apply


def smallest_eigenvalue(apply: Callable, p: int, steps: int, seed: int) -> float:
    """The smallest Ritz value of ``apply`` (a symmetric P x P operator on rows) after min(steps, P) Lanczos
    steps with full reorthogonalisation from a seeded random start: an upper bound on the smallest eigenvalue,
    equal to it once the steps reach P. O(m x HVP + m^2 x P) for m steps, in float64 for the recurrence."""
    m = min(steps, p)
    q = torch.randn(p, generator=torch_generator(seed), dtype=torch.float64)
    basis = [q / q.norm()]
    alpha, beta = [], []
    for j in range(m):
        w = apply(basis[j].float().unsqueeze(0))[0].double()
        alpha.append(float(w @ basis[j]))
        q_all = torch.stack(basis)  # (j + 1, P)
        w = w - q_all.T @ (q_all @ w)
        w = w - q_all.T @ (q_all @ w)  # twice: full reorthogonalisation
        b = float(w.norm())
        if j == m - 1 or b <= 1e-10 * max(abs(a) for a in alpha):  # an invariant subspace: its values are exact
            break
        beta.append(b)
        basis.append(w / b)
    tri = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    off = torch.tensor(beta[:len(alpha) - 1], dtype=torch.float64)
    tri += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(tri)[0])


def damping_for(smallest: float, damping: float) -> float:
    """The damping of :func:`~.newton.damped_cholesky`'s rule: ``damping`` doubled until smallest + d > 0."""
    d = float(damping)
    for _ in range(MAX_DOUBLINGS):
        if smallest + d > 0:
            return d
        d *= 2.0
    raise ConfigError(f"DDM: the distilled-set Hessian is not positive definite even with damping {d:g}; raise the "
                      "damping (--damping, DDMConfig.damping)")


@dataclass
class CGSolve:
    """What :func:`solve` returns: the steps and how the solve went."""

    x: torch.Tensor  # (K, P) solutions, row k of (H + d I)^{-1} b_k
    damping: float  # d used
    iterations: int  # CG iterations of the last solve (its slowest column)
    residual: float  # max over columns of ||b_k - (H + d I) x_k|| / ||b_k||, recomputed at the end
    converged: bool  # every column's recursive residual reached the tolerance within the iterations


def batched_cg(apply: Callable, b: torch.Tensor, iterations: int, tolerance: float):
    """K independent conjugate-gradient solves of apply(x) = b (rows), vectorised: (x (K, P), iterations run,
    whether a search direction met curvature <= 0 (the operator is not positive definite: x is then unfinished),
    whether every column converged). A column stops once its recursive residual ||r|| <= tolerance x ||b|| (a
    zero b at once). O(iterations x (HVP block + K x P))."""
    x, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), (r * r).sum(1)  # (K,)
    goal = (tolerance * b.norm(dim=1)) ** 2
    it = 0
    while it < iterations and bool((active := rs > goal).any()):
        ap = apply(p)
        curv = (p * ap).sum(1)
        if bool((curv[active] <= 0).any()):
            return x, it, True, False
        alpha = torch.where(active, rs / torch.where(active, curv, 1.0), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        beta = torch.where(active, rs_new / torch.where(active, rs, 1.0), 0.0)
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        rs, it = torch.where(active, rs_new, rs), it + 1
    return x, it, False, not bool((rs > goal).any())


def solve(hvp: Callable, b: torch.Tensor, damping: float, iterations: int, tolerance: float) -> CGSolve:
    """(H + d I) x = b (rows of b, H given by ``hvp``) by :func:`batched_cg`, d starting at ``damping`` and doubled
    while CG meets curvature <= 0 (a Lanczos estimate above the smallest eigenvalue). Each restart costs one
    more solve; at most :data:`MAX_DOUBLINGS`."""
    d = float(damping)
    for _ in range(MAX_DOUBLINGS):
        def op(v, d=d):
            return hvp(v) + d * v
        x, its, negative, converged = batched_cg(op, b, iterations, tolerance)
        if not negative:
            norms = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
            return CGSolve(x, d, its, float(((b - op(x)).norm(dim=1) / norms).max()), converged)
        d *= 2.0
    raise ConfigError(f"DDM: the distilled-set Hessian is not positive definite even with damping {d:g}; raise the "
                      "damping (--damping, DDMConfig.damping)")


def prepare(model, params: T.Params, xs: torch.Tensor, soft: torch.Tensor, weights: torch.Tensor,
            weight_decay: float, damping: float, seed: int) -> tuple[Callable, float]:
    """The offline part, once per model: (V -> V (H + weight_decay I), the damping to start CG with), H the
    distilled set's Hessian (samples ``xs`` weighted by ``weights``) at ``params``, the damping by
    :func:`damping_for` from a Lanczos estimate of the smallest eigenvalue (seeded by ``seed``).
    O(LANCZOS_STEPS x (n_syn x P + LANCZOS_STEPS x P))."""
    hvp = hvp_operator(model, params, xs, soft, weights, shift=weight_decay)
    smallest = smallest_eigenvalue(hvp, N.flatten(params).numel(), LANCZOS_STEPS, seed)
    return hvp, damping_for(smallest, damping)

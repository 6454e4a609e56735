"""Config of DDM data attribution."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from modelatlas.config_types import fits
from modelatlas.errors import ConfigError

UNLEARN = ("auto", "newton", "cg", "ascent")


@dataclass
class DDMConfig:
    """DDM fields.

    Target model: an MLP (``width`` hidden units, ``depth`` layers) trained by full-batch gradient descent
    (lr ``lr``, ``train_steps`` steps, fixed seeded init, L2 penalty ``weight_decay`` / 2 x ||theta||^2) with
    ``checkpoints`` evenly spaced checkpoints kept.
    Offline: ``clusters_per_class`` k-means clusters per class; one synthetic sample per cluster (image and
    soft-label logits) learned by ``match_steps`` Adam steps (lr ``match_lr``) of reverse gradient matching.
    ``match_final`` also matches at the final weights (where the online step acts). ``samples_per_cluster`` m
    synthetic samples per cluster (their mean gradient is matched; init: the cluster mean and m - 1 random
    members): one sample's gradient is rank-1 per layer, so m > 1 helps where cluster gradients are not.
    Online, ``unlearn``: ``"newton"`` removes cluster k with one Newton step on the distilled set,
    theta + n_k / (N - n_k) x (H + d I)^{-1} grad CE(s_k), H the Hessian of the size-weighted distilled set at
    the final weights, d from ``damping`` (doubled until H + d I is positive definite), see
    :mod:`~modelatlas.attribution.newton`; ``"ascent"`` (the plain unlearning of the paper) takes
    ``unlearn_steps`` gradient-ascent steps on the synthetic sample, step ``unlearn_lr`` x (cluster size / N);
    ``"cg"`` takes the same Newton step without forming H: conjugate gradients on Hessian-vector products
    (:mod:`~modelatlas.attribution.cg`), at most ``cg_iterations`` iterations, stopping at a relative residual
    ``cg_tolerance``, d from ``damping`` by the same doubling rule (on a Lanczos estimate of H's smallest
    eigenvalue); ``"auto"`` (default) is Newton where its exact Hessian fits (a target of at most
    :data:`~modelatlas.attribution.ddm.MAX_NEWTON_PARAMS` parameters: digits') and CG otherwise
    (:func:`~modelatlas.attribution.ddm.unlearn_choice`).
    """

    clusters_per_class: int = 5
    width: int = 32
    depth: int = 1
    lr: float = 0.2
    train_steps: int = 100
    checkpoints: int = 5
    match_steps: int = 30
    match_lr: float = 0.05
    unlearn_steps: int = 1
    unlearn_lr: float = 0.5
    match_final: bool = True
    unlearn: str = "auto"
    damping: float = 0.1
    weight_decay: float = 0.0
    samples_per_cluster: int = 1
    cg_iterations: int = 500
    cg_tolerance: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("clusters_per_class", "width", "depth", "train_steps", "checkpoints", "unlearn_steps",
                     "samples_per_cluster", "match_steps", "cg_iterations"):
            value, low = getattr(self, name), 0 if name == "match_steps" else 1
            if not fits(value, int) or value < low:  # True is an int, but not here
                raise ConfigError(f"{name} must be >= {low} (an integer), got {value!r}")
        for name in ("train_steps", "match_steps", "unlearn_steps", "cg_iterations"):  # 10^11 steps ran silently for hours
            if getattr(self, name) > MAX_STEPS:
                raise ConfigError(f"{name} must be at most {MAX_STEPS:,}, got {getattr(self, name):,}")
        if self.unlearn not in UNLEARN:
            raise ConfigError(f"unlearn must be one of {', '.join(UNLEARN)}, got {self.unlearn!r}")
        for name in ("lr", "match_lr", "unlearn_lr", "damping", "weight_decay"):
            value, positive = getattr(self, name), name != "weight_decay"
            # NaN or inf used to pass (weight_decay) and fail later as a Hessian 'with NaN/inf entries'
            if not _finite(value) or value < 0 or (positive and value == 0):
                raise ConfigError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value!r}")
        if self.damping > MAX_DAMPING:  # float32 Hessians overflow past ~3e38, and the damping may double 40 times
            raise ConfigError(f"damping must be at most {MAX_DAMPING:g}, got {self.damping!r}")
        if not _finite(self.cg_tolerance) or not 0 < self.cg_tolerance < 1:  # 0: CG would run every iteration
            raise ConfigError(f"cg_tolerance must be > 0 and < 1 (the relative residual at which conjugate gradients "
                              f"stop, e.g. 1e-5), got {self.cg_tolerance!r}")
        if not isinstance(self.match_final, bool):
            raise ConfigError(f"match_final must be true or false, got {self.match_final!r}")

    def to_dict(self) -> dict:
        return asdict(self)


MAX_STEPS = 1_000_000
MAX_DAMPING = 1e20


def _finite(value) -> bool:
    return fits(value, float) and math.isfinite(value)

"""Config of Teddy (Taylor-approximated dataset distillation with a model pool)."""

from __future__ import annotations

from dataclasses import dataclass

from modelatlas.distill.methods.base import MethodConfig, check_choice, check_fraction, check_positive
from modelatlas.errors import ConfigError

POOL_KINDS = ("prior", "post", "both")


def prior_count(kind: str, size: int) -> int:
    """How many of a pool's ``size`` models are early ("prior") checkpoints; the rest are "post" models."""
    return {"prior": size, "post": 0, "both": size // 2}[kind]


@dataclass
class TeddyConfig(MethodConfig):
    """Teddy fields.

    Pool (built once per (dataset, config) and cached under ``cache_dir``; None: $ATLAS_CACHE_DIR/teddy or
    ~/.cache/modelatlas/teddy): ``pool_kind`` "prior" (``pool_size`` early checkpoints of one base model's
    training, spread over its first ``prior_fraction`` of ``base_steps``), "post" (``pool_size`` copies of
    the trained base model, each magnitude-pruned by ``prune_ratio`` and fine-tuned ``finetune_steps`` SGD
    steps with its own data order) or "both" (half each). Default "prior": on digits IPC 10 the "both" pool
    (pruned near-converged models) made the images worse than their real init (86.6 % vs 95.4 %).
    ``pool_bases`` > 1 (beyond the paper's one base model) spreads the prior checkpoints over that many base
    models trained from different seeds, so the images are not matched to one initialisation's features only.
    Outer step: sample one pool model, then for ``traj_steps`` steps: accumulate the per-class gradient
    disagreement (1 - cos, per layer) between real and synthetic data into the image gradient, and move the
    model one SGD step (``lr_net``) on real data (no graph kept). Image SGD lr ``lr_img`` mom ``momentum_img``.
    """

    iterations: int = 200
    pool_kind: str = "prior"
    pool_size: int = 8
    pool_bases: int = 1
    base_steps: int = 300
    prior_fraction: float = 0.3
    prune_ratio: float = 0.5
    finetune_steps: int = 20
    traj_steps: int = 5
    lr_net: float = 0.01
    lr_img: float = 0.1
    momentum_img: float = 0.5
    batch_real: int = 256
    init: str = "real"
    dsa: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "pool_size", "pool_bases", "base_steps", "traj_steps", "lr_net", "lr_img", "batch_real")
        if self.pool_kind not in POOL_KINDS:
            raise ConfigError(f"pool_kind must be one of {', '.join(POOL_KINDS)}, got {self.pool_kind!r}")
        if not 0 < self.prior_fraction <= 1:
            raise ConfigError(f"prior_fraction must be in (0, 1], got {self.prior_fraction}")
        if not 0 <= self.prune_ratio < 1:
            raise ConfigError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if self.finetune_steps < 0:
            raise ConfigError(f"finetune_steps must be >= 0, got {self.finetune_steps}")
        n_prior = prior_count(self.pool_kind, self.pool_size)
        if self.pool_bases > max(n_prior, 1):
            raise ConfigError(f"pool_bases ({self.pool_bases}) must be <= the pool's prior checkpoints ({n_prior}):"
                              " lower pool_bases or raise pool_size")
        check_fraction(self, "momentum_img")
        check_choice(self, "init")

    def pool_fields(self) -> dict:
        """The fields that decide the pool's content (its cache key)."""
        keys = ("pool_kind", "pool_size", "pool_bases", "base_steps", "prior_fraction", "prune_ratio", "finetune_steps",
                "lr_net", "batch_real", "net", "width", "depth")
        return {k: getattr(self, k) for k in keys}

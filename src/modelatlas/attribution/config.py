"""Config of DDM data attribution."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from modelatlas.errors import ConfigError


@dataclass
class DDMConfig:
    """DDM fields.

    Target model: an MLP (``width`` hidden units, ``depth`` layers) trained by full-batch gradient descent
    (lr ``lr``, ``train_steps`` steps, fixed seeded init) with ``checkpoints`` evenly spaced checkpoints kept.
    Offline: ``clusters_per_class`` k-means clusters per class; one synthetic sample per cluster (image and
    soft-label logits) learned by ``match_steps`` Adam steps (lr ``match_lr``) of reverse gradient matching.
    Online: ``unlearn_steps`` gradient-ascent steps on the cluster's synthetic sample from the final weights,
    step ``unlearn_lr`` x (cluster size / N). Small steps (the linear regime) rank best on digits: with
    lr x train_steps (the cluster's whole training budget) the ascent overshoots and the ranking degrades.
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

    def __post_init__(self) -> None:
        for name in ("clusters_per_class", "width", "depth", "train_steps", "checkpoints", "unlearn_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "match_lr", "unlearn_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.match_steps < 0:
            raise ConfigError(f"match_steps must be >= 0, got {self.match_steps}")

    def to_dict(self) -> dict:
        return asdict(self)

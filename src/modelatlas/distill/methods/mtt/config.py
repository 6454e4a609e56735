"""Config of MTT (matching training trajectories)."""

from __future__ import annotations

from dataclasses import dataclass

from modelatlas.distill.methods.base import MethodConfig, check_choice, check_fraction, check_positive
from modelatlas.errors import ConfigError


@dataclass
class MTTConfig(MethodConfig):
    """Expert buffer: ``num_experts`` networks trained ``expert_epochs`` epochs (SGD ``lr_teacher``, batch
    ``batch_expert``, DSA when ``dsa``) [paper: 100 experts x 50 epochs]; cached in ``cache_dir`` (default
    ``$ATLAS_CACHE_DIR/mtt`` or ``~/.cache/modelatlas/mtt``) and reused by every run with the same data, net,
    expert settings and seed. Each outer step: ``syn_steps`` differentiable SGD steps (N) from a random
    expert epoch t <= ``max_start_epoch``, matched to epoch t + ``expert_step`` (M) [N 10-80, M 2]."""

    iterations: int = 300
    num_experts: int = 3
    expert_epochs: int = 12
    lr_teacher: float = 0.01
    batch_expert: int = 256
    syn_steps: int = 10
    expert_step: int = 2
    max_start_epoch: int = 10
    batch_syn: int | None = None
    lr_img: float = 100.0
    momentum_img: float = 0.5
    lr_lr: float = 1e-6
    lr_init: float | None = None
    dsa: bool = True
    init: str = "real"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "num_experts", "expert_epochs", "lr_teacher", "batch_expert", "syn_steps",
                       "expert_step", "batch_syn", "lr_img", "lr_lr", "lr_init")
        if self.max_start_epoch < 0:
            raise ConfigError(f"max_start_epoch must be >= 0, got {self.max_start_epoch}")
        if self.max_start_epoch + self.expert_step > self.expert_epochs:
            raise ConfigError(f"max_start_epoch + expert_step ({self.max_start_epoch} + {self.expert_step}) must be "
                              f"<= expert_epochs ({self.expert_epochs}); raise expert_epochs or lower max_start_epoch")
        check_fraction(self, "momentum_img")
        check_choice(self, "init")

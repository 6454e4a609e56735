"""Config of herding selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from modelatlas.distill.methods.base import MethodConfig, check_positive
from modelatlas.errors import ConfigError


@dataclass
class HerdingConfig(MethodConfig):
    """``embed``: "trained" (a ConvNet trained ``train_steps`` SGD steps on the real data, as in the DC
    paper's baseline), "random" (an untrained ConvNet) or "pixels". ``iterations`` is unused."""

    iterations: int = 0
    min_iterations: ClassVar[int] = 0
    embed: str = "trained"
    train_steps: int = 300
    lr: float = 0.01
    batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embed not in ("trained", "random", "pixels"):
            raise ConfigError(f"embed must be 'trained', 'random' or 'pixels', got {self.embed!r}")
        check_positive(self, "lr", "batch_size")
        if self.train_steps < 0:
            raise ConfigError(f"train_steps must be >= 0, got {self.train_steps}")

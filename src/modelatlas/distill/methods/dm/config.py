"""Config of DM distribution matching."""

from __future__ import annotations

from dataclasses import dataclass

from modelatlas.distill.methods.base import MethodConfig, check_positive
from modelatlas.errors import ConfigError


@dataclass
class DMConfig(MethodConfig):
    """Paper: 20,000 iterations, image SGD lr 1 momentum 0.5, real batch 256, DSA on, init from real."""

    iterations: int = 500
    lr_img: float = 1.0
    momentum_img: float = 0.5
    batch_real: int = 256
    init: str = "real"
    dsa: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "lr_img", "batch_real")
        if not 0 <= self.momentum_img < 1:
            raise ConfigError(f"momentum_img must be in [0, 1), got {self.momentum_img}")
        if self.init not in ("real", "noise"):
            raise ConfigError(f"init must be 'real' or 'noise', got {self.init!r}")

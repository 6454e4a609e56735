"""Config of DM distribution matching."""

from __future__ import annotations

from dataclasses import dataclass

from modelatlas.distill.methods.base import MethodConfig, check_choice, check_fraction, check_positive


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
        check_fraction(self, "momentum_img")
        check_choice(self, "init")

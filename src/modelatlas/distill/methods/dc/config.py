"""Config of DC / DSA gradient matching."""

from __future__ import annotations

from dataclasses import dataclass

from modelatlas.distill.methods.base import MethodConfig, check_choice, check_fraction, check_positive
from modelatlas.errors import ConfigError

# ipc -> (outer_loop, inner_loop), from the DC reference code.
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


@dataclass
class DCConfig(MethodConfig):
    """``outer_loop``/``inner_loop`` None: (1, 1) at IPC 1, (10, 50) at IPC 10, (50, 10) at IPC 50 (nearest
    tabulated IPC otherwise). ``iterations``: outer iterations, each with a fresh network (paper: 1000)."""

    iterations: int = 200
    outer_loop: int | None = None
    inner_loop: int | None = None
    lr_img: float = 0.1
    momentum_img: float = 0.5
    lr_net: float = 0.01
    batch_real: int = 256
    batch_train: int = 256
    init: str = "real"
    dsa: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "lr_img", "lr_net", "batch_real", "batch_train", "outer_loop")
        if self.inner_loop is not None and self.inner_loop < 0:
            raise ConfigError(f"inner_loop must be >= 0, got {self.inner_loop}")
        check_fraction(self, "momentum_img")
        check_choice(self, "init")

    def loops(self, ipc: int) -> tuple[int, int]:
        """(outer_loop, inner_loop) for ``ipc``."""
        nearest = min(LOOPS, key=lambda k: abs(k - ipc))
        outer, inner = LOOPS[nearest]
        return self.outer_loop or outer, self.inner_loop if self.inner_loop is not None else inner


@dataclass
class DSAConfig(DCConfig):
    """DC with differentiable siamese augmentation (paper: 1000 iterations, eval with DSA, 1000 epochs)."""

    dsa: bool = True

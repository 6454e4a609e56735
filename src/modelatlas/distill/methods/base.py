"""What every method shares: the base config fields and the run context.

A method is a folder ``methods/<name>/`` with ``config.py`` (a dataclass derived from
:class:`MethodConfig`) and ``method.py`` (``run(train, ipc, config, ctx) -> SyntheticSet``), registered in
its ``__init__.py`` with :func:`modelatlas.distill.methods.register`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelatlas.distill.loop import OuterLoop
from modelatlas.distill.nets import NET_NAMES, default_net
from modelatlas.errors import ConfigError
from modelatlas.progress import Progress


@dataclass
class MethodConfig:
    """Fields every method has. ``width``/``depth`` None: the standard net for the input size
    (:func:`~modelatlas.distill.nets.default_net`)."""

    iterations: int = 100
    net: str = "convnet"
    width: int | None = None
    depth: int | None = None
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ConfigError(f"iterations must be >= 0, got {self.iterations}")
        if self.net not in NET_NAMES:
            raise ConfigError(f"net must be one of {', '.join(NET_NAMES)}, got {self.net!r}")
        for name in ("width", "depth"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 (or None for the default), got {v}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def net_spec(self, in_shape: tuple[int, ...]) -> dict:
        """{"net", "width", "depth"} with defaults filled in for this input shape."""
        d = default_net(in_shape) if len(in_shape) == 3 else {"net": "convnet", "width": 128, "depth": 3}
        return {"net": self.net, "width": self.width or d["width"], "depth": self.depth or d["depth"]}

    def to_dict(self) -> dict:
        return asdict(self)


def check_positive(cfg: Any, *names: str) -> None:
    """Raise ConfigError naming the first field of ``names`` that is not > 0."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise ConfigError(f"{name} must be > 0, got {v}")


def check_fraction(cfg: Any, *names: str) -> None:
    """Raise ConfigError naming the first field of ``names`` not in [0, 1) (momenta, EMA factors)."""
    for name in names:
        v = getattr(cfg, name)
        if not 0 <= v < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {v}")


def check_choice(cfg: Any, name: str, choices: tuple[str, ...] = ("real", "noise")) -> None:
    """Raise ConfigError naming field ``name`` when its value is not one of ``choices``."""
    v = getattr(cfg, name)
    if v not in choices:
        allowed = " or ".join(repr(c) for c in choices) if len(choices) == 2 else "one of " + ", ".join(choices)
        raise ConfigError(f"{name} must be {allowed}, got {v!r}")


@dataclass
class DistillContext:
    """Run-time settings passed to a method: seed, progress, checkpointing, device; collects the losses."""

    seed: int = 0
    progress: Progress | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    losses: list[float] = field(default_factory=list)

    def run_loop(self, iterations: int, checkpoint_every: int, step, states: dict, desc: str) -> list[float]:
        """Run an :class:`~modelatlas.distill.loop.OuterLoop` and keep its loss history in ``self.losses``."""
        loop = OuterLoop(iterations, self.seed, self.progress, self.checkpoint_dir, checkpoint_every,
                         self.resume, desc)
        self.losses = loop.run(step, states)
        return self.losses

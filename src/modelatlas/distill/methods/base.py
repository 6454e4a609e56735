"""What every method shares: the base config fields and the run context.

A method is a folder ``methods/<name>/`` with ``config.py`` (a dataclass derived from
:class:`MethodConfig`) and ``method.py`` (``run(train, ipc, config, ctx) -> SyntheticSet``), registered in
its ``__init__.py`` with :func:`modelatlas.distill.methods.register`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from modelatlas.config_types import misfit
from modelatlas.distill.loop import OuterLoop
from modelatlas.distill.nets import MAX_DEPTH, MAX_WIDTH, NET_NAMES, default_net
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import ConfigError
from modelatlas.progress import Progress
from modelatlas.seeding import derive_seed, torch_generator


@dataclass
class MethodConfig:
    """Fields every method has. ``width``/``depth`` None: the standard net for the input size
    (:func:`~modelatlas.distill.nets.default_net`)."""

    iterations: int = 100
    net: str = "convnet"
    width: int | None = None
    depth: int | None = None
    checkpoint_every: int = 50
    # 0 only where no iteration still does something (a method that ignores them, HeLlO's projector-only run);
    # elsewhere iterations=0 returned the untouched start, scored and saved as the method's result
    min_iterations: ClassVar[int] = 1

    def __post_init__(self) -> None:
        check_types(self)
        if self.iterations < self.min_iterations:
            why = " (0 would return the starting set unchanged)" if self.min_iterations else ""
            raise ConfigError(f"iterations must be >= {self.min_iterations}{why}, got {self.iterations}")
        if self.net not in NET_NAMES:
            raise ConfigError(f"net must be one of {', '.join(NET_NAMES)}, got {self.net!r}")
        for name in ("width", "depth"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 (or None for the default), got {v}")
        if self.width is not None and self.width > MAX_WIDTH:  # 100000 ended in an allocator traceback
            raise ConfigError(f"width must be at most {MAX_WIDTH:,} (a ConvNet layer holds ~9 x width**2 weights), "
                              f"got {self.width:,}; lower --set width=...")
        if self.depth is not None and self.depth > MAX_DEPTH:
            raise ConfigError(f"depth must be at most {MAX_DEPTH}, got {self.depth:,}; lower --set depth=...")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    def net_spec(self, in_shape: tuple[int, ...]) -> dict:
        """{"net", "width", "depth"} with defaults filled in for this input shape."""
        d = default_net(in_shape) if len(in_shape) == 3 else {"net": "convnet", "width": 128, "depth": 3}
        return {"net": self.net, "width": self.width or d["width"], "depth": self.depth or d["depth"]}

    def to_dict(self) -> dict:
        return asdict(self)


def check_types(cfg: Any) -> None:
    """Raise ConfigError naming the first field whose value is not of its annotated type: a config built in
    Python was not checked (``DMConfig(dsa="no")`` turned DSA on, ``batch_real=2.5`` failed in slicing)."""
    bad = misfit({f.name: getattr(cfg, f.name) for f in fields(cfg)}, type(cfg))
    if bad is not None:
        raise ConfigError(f"{bad.key} must be {bad.names}, got {bad.value!r}")


def check_positive(cfg: Any, *names: str, unbounded: tuple[str, ...] = ()) -> None:
    """Raise ConfigError naming the first field of ``names`` that is not > 0 and finite (an infinite learning
    rate or batch gave NaN images scored as a result); the fields in ``unbounded`` may be infinite (a method's
    "no limit", e.g. RaT-BPTT's ``clip_factor``: no gradient clipping)."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise ConfigError(f"{name} must be > 0, got {v}")
        if v is not None and v == float("inf") and name not in unbounded:
            raise ConfigError(f"{name} must be finite, got {v}")


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
    init: SyntheticSet | None = None  # start from this set instead of ``config.init`` (see init_synthetic)
    wall_offset: float = 0.0  # seconds the earlier parts of a resumed run took
    checkpoint: dict | None = None  # checkpoint.json of a resumed run, read once (loop.read_checkpoint)
    started: float = field(default_factory=time.perf_counter)
    idle: bool = False  # a resume of a finished run: this part distilled nothing

    def elapsed(self) -> float:
        """Wall seconds of the run so far, earlier parts of a resumed run included (only those, when this part
        found no iteration left: its setup, ~1 s, was added to the run's time by every such resume)."""
        return self.wall_offset + (0.0 if self.idle else time.perf_counter() - self.started)

    def run_loop(self, iterations: int, checkpoint_every: int, step, states: dict, desc: str) -> list[float]:
        """Run an :class:`~modelatlas.distill.loop.OuterLoop` and keep its loss history in ``self.losses``."""
        loop = OuterLoop(iterations, self.seed, self.progress, self.checkpoint_dir, checkpoint_every,
                         self.resume, desc, clock=self.elapsed, checkpoint=self.checkpoint, device=self.device)
        self.losses = loop.run(step, states)
        self.idle = self.resume and 0 < loop.start == loop.iterations
        return self.losses


def init_synthetic(train, ipc: int, init: str, ctx: DistillContext) -> SyntheticSet:
    """The starting set: a copy of ``ctx.init`` when one is given (e.g. DM's images for HeLlO), else ``ipc``
    seeded real images per class (``init="real"``) or Gaussian noise (``"noise"``).

    A given set must match the data: same input shape, classes and ``ipc`` (the error names the mismatch).
    Only its images and class layout are taken; learned labels or a learned lr are the method's own to make."""
    if ctx.init is not None:
        return _checked_copy(ctx.init, train, ipc)
    gen = torch_generator(derive_seed(ctx.seed, "init"))
    if init == "real":
        return SyntheticSet.from_real(train, ipc, gen)
    return SyntheticSet.from_noise(train.input_shape, train.num_classes, ipc, gen, class_names=train.classes)


def _checked_copy(given: SyntheticSet, train, ipc: int) -> SyntheticSet:
    shape, where = tuple(given.images.shape[1:]), given.meta.get("source", "init set")
    if shape != tuple(train.input_shape):
        raise ConfigError(f"{where}: images of shape {shape}, but the dataset's are {tuple(train.input_shape)}")
    if "poster" in given.extras or given.meta.get("method") == "podd":  # it said '(4 per class)' of 44 crops
        raise ConfigError(f"{where}: a poster's {len(given)} overlapping crops, not images per class; start from "
                          "a set of images per class (another method's result)")
    if given.num_classes != train.num_classes or given.ipc != ipc or len(given) != ipc * train.num_classes:
        raise ConfigError(f"{where}: {len(given)} images of {given.num_classes} classes ({given.ipc} per class), "
                          f"but this run wants {ipc} per class of {train.num_classes}")
    return SyntheticSet(given.images, given.classes, given.num_classes, class_names=train.classes,
                        meta={"init": given.meta.get("method", "given set")})

"""ProbeX expert configuration (a dataclass validated in ``__post_init__``)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

from modelatlas.config_types import fits
from modelatlas.errors import ConfigError

_MODELS = ("probex", "dense")


@dataclass
class ProbeXConfig:
    """Hyperparameters of one expert.

    ``rank_u`` probes, ``rank_v`` shared-projection width and ``rank_t`` representation size; the paper
    used 128 for all three (keep that for large layers; small layers do as well with 16-32).
    ``model`` is ``"probex"`` or ``"dense"`` (the dense linear expert baseline). ``relu=False`` removes the
    ProbeX non-linearity (the paper's ablation). ``center`` subtracts the training models' mean weight
    matrix, so the expert sees each model's deviation from its tree (the nuisance shared by a tree cancels).
    Optimisation follows the paper: Adam, ``lr`` 1e-3 (2e-3 for text alignment), ``weight_decay`` 1e-5,
    batch 128; the best-validation state is kept. ``temperature`` scales the cosine logits of text alignment.
    """

    rank_u: int = 32
    rank_v: int = 32
    rank_t: int = 32
    model: str = "probex"
    relu: bool = True
    center: bool = True
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 128
    val_fraction: float = 0.15
    checkpoint_every: int = 10
    temperature: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank_u", "rank_v", "rank_t", "epochs", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if not fits(value, int) or value < 1:
                raise ConfigError(f"ProbeXConfig.{name} must be a positive integer; got {value!r}")
        if self.model not in _MODELS:
            raise ConfigError(f"ProbeXConfig.model must be one of {_MODELS}; got {self.model!r}")
        for name in ("relu", "center"):
            if not isinstance(getattr(self, name), bool):  # "false" from a hand-edited file would be truthy
                raise ConfigError(f"ProbeXConfig.{name} must be true or false; got {getattr(self, name)!r}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ConfigError(f"ProbeXConfig.seed must be an integer; got {self.seed!r}")
        if not -(2**63) <= self.seed < 2**64:  # torch's generators take no more: an overflow traceback mid-training
            raise ConfigError(f"ProbeXConfig.seed (--seed) must be from -2**63 to 2**64 - 1; got {self.seed!r}")
        for name in ("lr", "temperature", "weight_decay", "val_fraction"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"ProbeXConfig.{name} must be a finite number; got {value!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ProbeXConfig.{name} must be > 0; got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"ProbeXConfig.weight_decay must be >= 0; got {self.weight_decay!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"ProbeXConfig.val_fraction must be in [0, 1); got {self.val_fraction!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProbeXConfig:
        """Build from JSON; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ProbeXConfig key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

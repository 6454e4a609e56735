"""Config of the random-subset baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from modelatlas.distill.methods.base import MethodConfig


@dataclass
class RandomConfig(MethodConfig):
    """No optimisation: ``iterations`` is ignored."""

    iterations: int = 0
    min_iterations: ClassVar[int] = 0

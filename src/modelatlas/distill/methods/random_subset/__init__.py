"""``random``: a random real subset, ``ipc`` images per class (the baseline every method is compared to)."""

from modelatlas.distill.methods import MethodSpec, register
from modelatlas.distill.methods.random_subset.config import RandomConfig
from modelatlas.distill.methods.random_subset.method import run

register(MethodSpec("random", RandomConfig, run, "random real images per class (baseline)"))

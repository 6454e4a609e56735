"""Seeds and random generators: every random process in modelatlas takes a seed."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads with the first generator: checking a seed (a config) needs none
    import torch

SEED_RANGE = "an integer from -2**63 to 2**63 - 1"


def is_seed(value: object) -> bool:
    """Whether ``value`` is a usable seed: an int (not a bool, not 1.5, which was truncated to 1) in [-2**63,
    2**63). :func:`derive_seed` reduces seeds to 64 bits, so a larger one silently repeats another (2**64 is 0)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (for code we do not control)."""
    import torch

    random.seed(seed)
    np.random.seed(torch_seed(seed))  # NumPy's legacy seed is 32 bits too
    torch.manual_seed(torch_seed(seed))


def torch_generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with ``seed`` (pass it explicitly instead of touching global state)."""
    import torch

    g = torch.Generator()
    g.manual_seed(torch_seed(seed))
    return g


def torch_seed(seed: int) -> int:
    """``seed`` as torch's CPU generator can tell it apart: that generator keeps only the low 32 bits, so 2**32
    repeated seed 0. A seed in [0, 2**32) is kept as it is (the streams of those seeds are unchanged); any other
    is hashed with all its bits into that range (distinct seeds then meet only by chance, ~2**-32)."""
    seed = int(seed)
    if 0 <= seed < 2**32:
        return seed
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, 1 if seed < 0 else 0, 0x5EED]
    return int(np.random.default_rng(words).integers(0, 2**32))


def derive_seed(seed: int, *keys: object) -> int:
    """A child seed from a parent seed and keys, stable across runs and processes (no ``hash()``)."""
    # SeedSequence ignores trailing zero words, so (seed, "a") and (seed, "a", 0) would collide: the key
    # count and a non-zero end marker make every (seed, *keys) tuple a distinct entropy array.
    seed = int(seed)
    words = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, len(keys)] + [_key_int(k) for k in keys]
    rng = np.random.default_rng(words + [0x9E3779B9])
    return int(rng.integers(0, 2**31 - 1))


def _key_int(key: object) -> int:
    if isinstance(key, int):
        return key & 0xFFFFFFFF
    data = str(key).encode("utf-8")
    value = 0
    for byte in data:  # FNV-1a, stable unlike hash() under PYTHONHASHSEED
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value

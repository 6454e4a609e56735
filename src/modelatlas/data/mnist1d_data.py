"""``mnist1d``: the MNIST-1D benchmark (Greydanus), generated locally from its templates.

Uses ``mnist1d.data.make_dataset(get_dataset_args())`` (the default arguments: 5,000 signals of length 40,
4,000 train / 1,000 test, seed 42). Never ``get_dataset``, which downloads. Signals are (N, 1, 40) float32
and are not rescaled to [0, 1] (they are roughly zero-mean). Generation takes about a second.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from modelatlas.data.registry import ArrayDataset, module_status, register_dataset
from modelatlas.errors import DatasetNotFoundError

_CACHE: dict = {}


def _load_mnist1d(split: str) -> ArrayDataset:
    if "data" not in _CACHE:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError:
            raise DatasetNotFoundError(
                "mnist1d needs the mnist1d package, which is not installed; install it with "
                "`pip install modelatlas[data]`") from None
        _CACHE["data"] = _without_global_side_effects(make_dataset, get_dataset_args())
    d = _CACHE["data"]
    x, y = (d["x"], d["y"]) if split == "train" else (d["x_test"], d["y_test"])
    xt = torch.tensor(x, dtype=torch.float32).unsqueeze(1)  # (N, 1, 40)
    return ArrayDataset("mnist1d", xt, torch.tensor(y, dtype=torch.long), [str(i) for i in range(10)],
                        {"source": "mnist1d.data.make_dataset(get_dataset_args())"})


def _without_global_side_effects(fn, *args):
    """``fn(*args)`` with Python's and NumPy's global generators restored afterwards: make_dataset seeds both
    with 42, which reset a caller's seeded global state."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return fn(*args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


register_dataset("mnist1d", _load_mnist1d, "MNIST-1D signals (N, 1, 40), 10 classes, 4k/1k, generated locally",
                 lambda: module_status("mnist1d"))

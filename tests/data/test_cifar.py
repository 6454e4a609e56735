import pickle

import numpy as np
import pytest

from modelatlas.data import load_dataset
from modelatlas.data.cifar import safe_unpickle
from modelatlas.errors import DatasetNotFoundError, UnsafeCheckpointError


def make_cifar10(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(range(n)),
                 b"batch_label": b"x"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    names = [f"c{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=4))
    return root


def test_cifar10_loads_fake_batches(tmp_path):
    tr = load_dataset("cifar10", "train", root=make_cifar10(tmp_path))
    assert tr.x.shape == (20, 3, 32, 32) and tr.classes[3] == "c3" and tr.y[:4].tolist() == [0, 1, 2, 3]


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((3, 3072), np.uint8)
    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps({"data": data, "fine_labels": [0, 50, 99]}, protocol=4))
    te = load_dataset("cifar100", "test", root=tmp_path)
    assert te.y.tolist() == [0, 50, 99] and te.num_classes == 100


class _Evil:
    def __reduce__(self):
        return (builtins_exec, ("open('PWNED','w').write('x')",))


builtins_exec = exec


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil()}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match=r"data_batch_1: refused global builtins\.exec"):
        safe_unpickle(path)
    assert not (tmp_path / "PWNED").exists()


def test_object_array_is_refused(tmp_path):
    path = tmp_path / "obj"
    path.write_bytes(pickle.dumps({"data": np.array([1, "a"], dtype=object)}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="obj: refused"):
        safe_unpickle(path)


def test_cifar_missing_root_says_pass_root(tmp_path, monkeypatch):
    monkeypatch.delenv("ATLAS_CIFAR10", raising=False)
    with pytest.raises(DatasetNotFoundError, match="pass root="):
        load_dataset("cifar10")
    with pytest.raises(DatasetNotFoundError, match="data_batch_1 not found"):
        load_dataset("cifar10", root=tmp_path)

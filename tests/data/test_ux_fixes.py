"""Malformed inputs are refused with one line naming the file, key or value."""

import pickle

import numpy as np
import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.data.cifar import safe_unpickle
from modelatlas.data.registry import ArrayDataset
from modelatlas.errors import CheckpointError, ConfigError


def make_cifar10_batches(root, data, labels):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=4))
    return root


@pytest.mark.parametrize("labels", [[-1, 0], [0, 1, 2], [[0], [1]]])
def test_array_dataset_refuses_negative_or_malformed_labels(labels):
    with pytest.raises(ConfigError, match="dataset 'd': label"):
        ArrayDataset("d", torch.zeros(len(labels), 1), torch.tensor(labels), ["a", "b"])


PIXELS = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize("data,labels,message", [
    (PIXELS, [0, -1], "key 'labels' has label -1, outside 0..9"),
    (PIXELS, [0, 10], "key 'labels' has label 10, outside 0..9"),
    (PIXELS, ["cat", "dog"], "key 'labels' must be a flat list of integer class indices"),
    (PIXELS, [0.5, 1.0], "key 'labels' must be a flat list of integer class indices"),
    (np.full((2, 3072), 300), [0, 1], "key 'data' has pixel values 300..300; CIFAR pixels are integers 0-255"),
    (np.full((2, 3072), -1), [0, 1], "key 'data' has pixel values -1..-1"),
    (np.full((2, 3072), 0.5, np.float32), [0, 1], "key 'data' must hold integer pixel values 0-255"),
    (np.zeros((2, 3000), np.uint8), [0, 1], r"key 'data' must have shape \(N, 3072\)"),
    ([[1, 2], [3]], [0, 1], "key 'data' is not a rectangular"),
])
def test_cifar_batch_values_are_range_checked_naming_file_and_key(tmp_path, data, labels, message):
    root = make_cifar10_batches(tmp_path, data, labels)
    with pytest.raises(CheckpointError, match=message) as e:
        load_dataset("cifar10", "train", root=root)
    assert "data_batch_1" in str(e.value)


def make_shared_nested_pickle(depth):
    nested = []
    for _ in range(depth):
        nested = [nested, nested]  # each level references the one below twice: 2**depth paths
    return pickle.dumps({b"data": nested, b"labels": [0]}, protocol=4)


def test_shared_references_are_refused_fast(tmp_path):
    import time

    path = tmp_path / "data_batch_1"
    path.write_bytes(make_shared_nested_pickle(60))  # ~400 bytes, 2**60 values when expanded
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="shared references expand.*crafted pickle"):
        safe_unpickle(path)
    assert time.perf_counter() - start < 1.0


def test_shared_references_of_a_small_tree_still_parse(tmp_path):
    shared = [1, 2]
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({"a": shared, "b": shared, "c": (shared, shared)}, protocol=4))
    assert safe_unpickle(path) == {"a": [1, 2], "b": [1, 2], "c": ([1, 2], [1, 2])}


def test_a_list_containing_itself_is_refused(tmp_path):
    cyclic = []
    cyclic.append(cyclic)
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps(cyclic, protocol=4))
    with pytest.raises(CheckpointError, match="contains itself"):
        safe_unpickle(path)


@pytest.mark.parametrize("name,kwargs,message", [
    ("digits", {"root": "/data"}, "dataset 'digits' takes no data root"),
    ("mnist1d", {"root": "/data"}, "dataset 'mnist1d' takes no data root"),
    ("digits", {"size": 8}, "dataset 'digits' has no option 'size'; its options: test_fraction, seed"),
    ("digits", {"test_fraction": 0}, r"dataset 'digits': test_fraction must be a number in \(0, 1\), got 0"),
    ("digits", {"test_fraction": 1.5}, r"test_fraction must be a number in \(0, 1\), got 1.5"),
    ("digits", {"seed": "a"}, "dataset 'digits': seed must be an integer, got 'a'"),
    ("digits", {"seed": 2**70}, r"dataset 'digits': seed must be an integer from -2\*\*63 to 2\*\*63 - 1, "
                                r"got 1180591620717411303424"),
    ("digits", {"seed": 2**63}, r"dataset 'digits': seed must be an integer from -2\*\*63 to 2\*\*63 - 1, "
                                r"got 9223372036854775808"),
    ("mnist5k", {"seed": -2**63 - 1}, r"dataset 'mnist5k': seed must be an integer from -2\*\*63 to 2\*\*63 - 1"),
    ("image-folder", {"root": ".", "seed": 2**64}, r"dataset 'image-folder': seed must be an integer from -2\*\*63"),
    ("image-folder", {"root": ".", "size": 0}, "dataset 'image-folder': size must be an integer >= 1, got 0"),
    ("image-folder", {"root": ".", "channels": True}, r"channels must be 1 \(grayscale\) or 3 \(RGB\), got True"),
    ("image-folder", {"root": ".", "channels": 3.0}, r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 3.0"),
    ("image-folder", {"root": ".", "test_fraction": -0.1}, r"test_fraction must be a number in \[0, 1\)"),
])
def test_loader_options_are_checked_naming_the_key(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset(name, "train", **kwargs)


def test_image_folder_skips_hidden_files_and_folders_without_images(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((4, 4), 100, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a macOS resource fork
    (tmp_path / "notes").mkdir()  # no images: not a class
    (tmp_path / "notes" / "readme.txt").write_text("x")
    data = load_dataset("image-folder", "train", root=tmp_path, size=4, channels=1, test_fraction=0)
    assert data.classes == ["cat", "dog"] and len(data) == 4


def test_zca_of_constant_data_is_finite():
    from modelatlas.data.transforms import ZCA

    x = torch.full((6, 1, 2, 2), 0.5)
    zca = ZCA().fit(x)
    assert torch.isfinite(zca.transform(x)).all() and torch.allclose(zca.inverse(zca.transform(x)), x)


def test_missing_fashion_mnist_names_the_data_root_option(tmp_path):
    from modelatlas.errors import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="pass --data-root DIR"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def _write_tiny(name, folder):
    """One or two examples of ``name``'s on-disk format in ``folder``."""
    import gzip
    import struct

    from PIL import Image

    if name == "fashion-mnist":
        folder.mkdir(parents=True)
        for stem, arr in (("t10k-images-idx3-ubyte", np.zeros((2, 3, 3), np.uint8)),
                          ("t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))):
            head = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (folder / f"{stem}.gz").write_bytes(gzip.compress(head + arr.tobytes()))
    elif name == "cifar10":
        make_cifar10_batches(folder, np.zeros((2, 3072), np.uint8), [0, 1])
    else:  # two classes: one is refused (a classifier of one class is always right)
        for c in ("cat", "dog"):
            (folder / c).mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / c / "0.png")


@pytest.mark.parametrize("name,env", [("fashion-mnist", "ATLAS_FASHION_MNIST"), ("cifar10", "ATLAS_CIFAR10"),
                                      ("image-folder", None)])
def test_a_data_root_under_home_written_with_a_tilde_is_found(tmp_path, monkeypatch, name, env):
    """root="~/data" (or a quoted "~/data" in $ATLAS_...) was looked up as a folder literally named '~'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no folder named '~' here
    _write_tiny(name, tmp_path / "data")
    split = "train" if name == "image-folder" else "test"
    assert len(load_dataset(name, split, root="~/data")) > 0
    if env:
        monkeypatch.setenv(env, "~/data")
        assert len(load_dataset(name, split)) > 0


@pytest.mark.parametrize("name,env", [("fashion-mnist", "ATLAS_FASHION_MNIST"), ("cifar10", "ATLAS_CIFAR10"),
                                      ("cifar100", "ATLAS_CIFAR100")])
def test_missing_data_at_the_folder_an_environment_variable_names_says_so(tmp_path, monkeypatch, name, env):
    """$ATLAS_FASHION_MNIST set to a folder without the files said "... or set ATLAS_FASHION_MNIST", and the CIFAR
    loaders did not say where the folder came from: a variable set long ago was hard to suspect."""
    from modelatlas.errors import DatasetNotFoundError

    monkeypatch.setenv(env, str(tmp_path / "gone"))
    with pytest.raises(DatasetNotFoundError, match=rf"gone\S* not found \(the folder \${env} names\); "):
        load_dataset(name, "test")
    with pytest.raises(DatasetNotFoundError, match=r"elsewhere\S* not found; "):  # root= wins, and is not $...
        load_dataset(name, "test", root=tmp_path / "elsewhere")

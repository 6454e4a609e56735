"""Checks of the data a set is distilled from or scored on, made before any work: a run's training and test
splits, and a saved set against the data it is evaluated on or started from. Each of these once failed after
the whole run (a shape error in the evaluation) or printed a meaningless number (0 % on no test data, a set
scored against renamed classes). O(N) time."""

from __future__ import annotations

from pathlib import Path

import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.errors import ConfigError


def check_splits(train: ArrayDataset, test: ArrayDataset) -> ArrayDataset:
    """Refuse a test split of other inputs or classes than the training split, and a class without training
    examples; returns ``test`` checked by :func:`check_test_split`."""
    check_test_split(test)
    if train.input_shape != test.input_shape or train.num_classes != test.num_classes:
        raise ConfigError(f"dataset {train.name!r}: the training split has {train.num_classes} classes of inputs "
                          f"{train.input_shape}, the test split {test.num_classes} of {test.input_shape}; both "
                          "splits must come from the same data (source: "
                          f"{train.meta.get('source', '?')}, {test.meta.get('source', '?')})")
    check_train(train)
    return test


def check_train(train: ArrayDataset) -> None:
    """Refuse NaN / infinite inputs and a class without training examples (no real image could shape its
    synthetic ones)."""
    check_finite(train, "train")
    counts = torch.bincount(train.y, minlength=train.num_classes)
    if train.num_classes and int(counts.min()) == 0:  # "lower the ipc" cannot help a class of none
        c = train.classes[int(counts.argmin())]  # both layouts named: with train/ + test/ it is ROOT/train/c/
        raise ConfigError(f"class {c!r} of {train.name!r} has no training examples (image-folder: ROOT/train/{c}/ "
                          "holds no images, or, without ROOT/train/ and ROOT/test/, its few images all went to the "
                          "seeded 20 % test split); add training images to it, or remove the class from every split")


def check_test_split(test: ArrayDataset) -> ArrayDataset:
    """Refuse an empty test split, whose accuracy would read as 0 % (a tiny image folder's 20 % rounds to none),
    and NaN / infinite inputs."""
    if len(test) == 0:
        raise ConfigError(f"the test split of dataset {test.name!r} is empty, so nothing can be scored; give it "
                          "test images (image-folder: more images per class, or ROOT/train/ and ROOT/test/)")
    check_finite(test, "test")
    return test


def check_finite(data: ArrayDataset, split: str) -> None:
    """Refuse NaN or infinite inputs, naming the first such example: they reached training, where DM 'diverged'
    (lower the learning rates, it said) and the random subset and the evaluation scored chance. O(N D)."""
    ok = torch.isfinite(data.x)
    bad = ~(ok.flatten(1).all(1) if ok.dim() > 1 else ok)  # (N,); reshape(N, -1) fails on an empty split
    if bool(bad.any()):
        raise ConfigError(f"the {split} split of {data.name!r} holds NaN or infinite values (example "
                          f"{int(bad.nonzero()[0])}); clean or drop those examples")


def check_fits(folder: str | Path, syn: SyntheticSet, test: ArrayDataset) -> None:
    """Refuse a test set the saved set cannot be scored on (data moved to a folder of another dataset)."""
    shape, test_shape = tuple(syn.images.shape[1:]), tuple(test.input_shape)
    if test.num_classes != syn.num_classes or test_shape != shape:
        raise ConfigError(f"{folder}: the test set has {test.num_classes} classes of inputs {test_shape}, the "
                          f"synthetic set (synthetic.safetensors) {syn.num_classes} of {shape}; point --data-root "
                          "(root=) at the data the result was distilled from")
    check_class_names(folder, syn, test.classes, "the test set's", "point --data-root (root=) at the data the "
                       "result was distilled from")


def check_class_names(folder, syn: SyntheticSet, classes: list[str], whose: str, fix: str) -> None:
    """Refuse data whose classes are named otherwise than the set's (same count and shape: another image
    folder, or a class renamed), which scored the set against the wrong labels without a word. A set saved
    without names (class names "0", "1", ...) is not compared."""
    if syn.class_names == [str(i) for i in range(syn.num_classes)] or list(classes) == syn.class_names:
        return
    k = next((i for i, (a, b) in enumerate(zip(syn.class_names, classes)) if a != b), min(len(classes), syn.num_classes))
    ours = classes[k] if k < len(classes) else None
    theirs = syn.class_names[k] if k < syn.num_classes else None
    raise ConfigError(f"{folder}: {whose} class {k} is {ours!r}, the synthetic set's {theirs!r} (its synthetic.json's "
                      f"class_names: other data, or classes renamed); {fix}")

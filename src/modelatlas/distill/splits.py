"""Checks of a run's training and test splits, made before anything is distilled: each of these once failed
after the whole run (a shape error in the evaluation) or printed a meaningless number (0 % on no test data).
O(N) time."""

from __future__ import annotations

import torch

from modelatlas.data.registry import ArrayDataset
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
    counts = torch.bincount(train.y, minlength=train.num_classes)
    if train.num_classes and int(counts.min()) == 0:  # "lower the ipc" cannot help a class of none
        raise ConfigError(f"class {train.classes[int(counts.argmin())]!r} of {train.name!r} has no training "
                          "examples (image-folder: its few images may all have gone to the seeded 20 % test "
                          "split); add images to it, remove its folder, or use ROOT/train/ and ROOT/test/")
    return test


def check_test_split(test: ArrayDataset) -> ArrayDataset:
    """Refuse an empty test split, whose accuracy would read as 0 % (a tiny image folder's 20 % rounds to none)."""
    if len(test) == 0:
        raise ConfigError(f"the test split of dataset {test.name!r} is empty, so nothing can be scored; give it "
                          "test images (image-folder: more images per class, or ROOT/train/ and ROOT/test/)")
    return test

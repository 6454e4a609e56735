"""Offline datasets behind one registry: :func:`load_dataset` ``(name, split)`` -> :class:`ArrayDataset`.

Built in: ``digits`` (scikit-learn 8x8). Other loaders (Fashion-MNIST IDX, MNIST 5k, MNIST-1D, CIFAR python
format through a restricted unpickler, image folders) register themselves from their modules.
"""

from modelatlas.data.registry import ArrayDataset, available_datasets, load_dataset, register_dataset

__all__ = ["ArrayDataset", "available_datasets", "load_dataset", "register_dataset"]

"""Per-class k-means clustering of the training data (the groups DDM attributes to).

Cost O(N x K x D x iterations) (scikit-learn KMeans, seeded, ``n_init=4``).
"""

from __future__ import annotations

import numpy as np
import torch

from modelatlas.errors import ConfigError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed


def cluster_per_class(x: torch.Tensor, y: torch.Tensor, num_classes: int, per_class: int,
                      seed: int = 0, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(assign (N,) int64 cluster ids, cluster_class (num_classes * per_class,)); cluster c*per_class + j is the
    j-th cluster of class c. ``progress``: a bar over the classes ('k-means per class')."""
    from sklearn.cluster import KMeans

    flat = x.reshape(len(x), -1).numpy().astype(np.float64)  # (N, D)
    assign = torch.full((len(x),), -1, dtype=torch.long)
    for c in resolve(progress)(range(num_classes), total=num_classes, desc="k-means per class"):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) < per_class:  # a class of none: no clusters_per_class >= 1 helps, so do not suggest it
            lower = "lower it or " if len(idx) else "give the class training examples, or "
            raise ConfigError(f"class {c} has {len(idx)} of the {len(x)} training examples, fewer than "
                              f"clusters_per_class={per_class}; {lower}train on more data (--max-train)")
        distinct = len(np.unique(flat[idx.numpy()], axis=0))
        if distinct < per_class:  # k-means would leave a cluster empty: its mean image is 0/0 and NaN spreads
            raise ConfigError(f"class {c} has only {distinct} distinct examples, fewer than "
                              f"clusters_per_class={per_class}; lower clusters_per_class")
        km = KMeans(per_class, n_init=4, random_state=derive_seed(seed, "kmeans", c)).fit(flat[idx.numpy()])
        assign[idx] = torch.as_tensor(km.labels_, dtype=torch.long) + c * per_class
    return assign, torch.arange(num_classes).repeat_interleave(per_class)

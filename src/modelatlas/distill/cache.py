"""Where distillation methods keep what they train once and reuse: MTT's expert trajectories, Teddy's model
pool, HeLlO's teacher.

One root for all of them: a method's ``cache_dir`` field when set, else ``$ATLAS_CACHE_DIR/<kind>``, else
``~/.cache/modelatlas/<kind>`` (``$MODELATLAS_CACHE`` is still read, after ``$ATLAS_CACHE_DIR``, for caches
made before the two were one). An entry is named by :func:`cache_key`, a hash of a fingerprint of the training
tensors, the fields that determine the cached object, and the seed: the same key means the same object.
Fingerprint cost O(N x D): a SHA-256 of the pixels and labels (~0.75 ms per MB). Before session 28 it was two
sums over the pixels and a hash of the labels, which a flipped or permuted copy of the images shared: a
stale entry (trained on the other images) was reused. Entries made then are not found any more and are
trained again once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from modelatlas.data.registry import ArrayDataset
from modelatlas.digests import data_digest


def cache_root(kind: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of ``kind`` ("mtt", "teddy", "hello"): ``cache_dir`` itself when given."""
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("ATLAS_CACHE_DIR") or os.environ.get("MODELATLAS_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "modelatlas") / kind


def data_fingerprint(train: ArrayDataset) -> dict:
    """Name, shape, and a digest of the pixels and labels of ``train`` (:func:`~modelatlas.digests.data_digest`)."""
    return {"name": train.name, "shape": list(train.x.shape), "data": data_digest(train.x, train.y)}


def cache_key(train: ArrayDataset, fields: dict, seed: int, length: int = 16) -> str:
    """A stable hex hash of (data fingerprint, ``fields``, ``seed``); ``fields`` must be JSON-serialisable."""
    desc = {"data": data_fingerprint(train), "fields": fields, "seed": seed}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:length]

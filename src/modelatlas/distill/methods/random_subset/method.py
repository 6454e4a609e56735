"""Random real subset: ``ipc`` images per class drawn with the run's seed. O(N) time."""

from __future__ import annotations

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.methods.base import DistillContext
from modelatlas.distill.methods.random_subset.config import RandomConfig
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.seeding import derive_seed, torch_generator


def run(train: ArrayDataset, ipc: int, config: RandomConfig, ctx: DistillContext) -> SyntheticSet:
    syn = SyntheticSet.from_real(train, ipc, torch_generator(derive_seed(ctx.seed, "random-subset")))
    syn.meta["init"] = "random real subset"
    return syn

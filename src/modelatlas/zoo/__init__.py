"""Model zoos with known lineage: families of real, trained models and a manifest of the true parents.

Build one with :func:`make_zoo` (``ZooConfig`` or a :func:`preset`); the manifest
(:mod:`modelatlas.zoo.manifest`) is the ground truth every downstream test, demo and benchmark reads.
See ``docs/zoo.md``.
"""

from modelatlas.zoo.architectures import arch_config, build_model
from modelatlas.zoo.builder import make_zoo
from modelatlas.zoo.config import ZooConfig, preset, presets
from modelatlas.zoo.manifest import Manifest, ModelRecord, load_manifest, load_truth
from modelatlas.zoo.plan import plan_zoo
from modelatlas.zoo.samplers import SamplerContext, available_samplers, register_sampler
from modelatlas.zoo.store import load_model, load_state
from modelatlas.zoo.tasks import TRANSFORMS, resize, task_data

__all__ = [
    "Manifest", "ModelRecord", "SamplerContext", "TRANSFORMS", "ZooConfig", "arch_config", "available_samplers",
    "build_model", "load_manifest", "load_model", "load_state", "load_truth", "make_zoo", "plan_zoo", "preset", "presets",
    "register_sampler", "resize", "task_data",
]

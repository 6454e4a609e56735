"""Model zoos with known lineage: families of real, trained models and a manifest of the true parents.

The manifest (:mod:`modelatlas.zoo.manifest`) is the ground truth every downstream test, demo and
benchmark reads.
"""

from modelatlas.zoo.manifest import Manifest, ModelRecord, load_manifest

__all__ = ["Manifest", "ModelRecord", "load_manifest"]

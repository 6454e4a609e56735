"""The atlas: an index of models with their recovered lineage and predicted properties, searchable and
viewable (``atlas index build | show | search``; see docs/atlas.md)."""

from modelatlas.atlas.build import build_atlas
from modelatlas.atlas.index import Atlas, ModelEntry
from modelatlas.atlas.search import Hit, search_atlas

__all__ = ["Atlas", "Hit", "ModelEntry", "build_atlas", "search_atlas"]

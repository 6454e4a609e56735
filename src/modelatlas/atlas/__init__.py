"""The atlas: an index of models with their recovered lineage and predicted properties, searchable and
viewable (``atlas index build | show | search``; see docs/atlas.md). ``build_atlas`` (torch, the lineage
recovery) loads on first use: showing an atlas or searching it by keywords reads only its JSON."""

from modelatlas.atlas.index import Atlas, ModelEntry
from modelatlas.atlas.search import Hit, search_atlas

__all__ = ["Atlas", "Hit", "ModelEntry", "build_atlas", "search_atlas"]


def __getattr__(name: str):
    """``build_atlas``, imported when first asked for (PEP 562)."""
    if name == "build_atlas":
        from modelatlas.atlas.build import build_atlas

        return build_atlas
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Lineage recovery: which model was trained from which, from the weights alone (MoTHer and beyond).

``recover_lineage(weights) -> Forest`` / ``LineageRecovery(config).fit(weights)``; scoring against a zoo
manifest in :mod:`modelatlas.lineage.scoring`; DOT and Mermaid export in :mod:`modelatlas.lineage.export`.
The recovery (torch, scipy: ~1.5 s to import) loads on first use: reading a forest JSON (``atlas index show``)
needs neither.
"""

from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.forest import Edge, Forest

__all__ = ["Edge", "Forest", "LineageConfig", "LineageRecovery", "recover_lineage"]


def __getattr__(name: str):
    """``LineageRecovery`` and ``recover_lineage``, imported when first asked for (PEP 562)."""
    if name in ("LineageRecovery", "recover_lineage"):
        from modelatlas.lineage import recover

        return getattr(recover, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

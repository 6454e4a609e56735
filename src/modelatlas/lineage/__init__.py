"""Lineage recovery: which model was trained from which, from the weights alone (MoTHer and beyond).

``recover_lineage(weights) -> Forest`` / ``LineageRecovery(config).fit(weights)``; scoring against a zoo
manifest in :mod:`modelatlas.lineage.scoring`; DOT and Mermaid export in :mod:`modelatlas.lineage.export`.
"""

from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.forest import Edge, Forest
from modelatlas.lineage.recover import LineageRecovery, recover_lineage

__all__ = ["Edge", "Forest", "LineageConfig", "LineageRecovery", "recover_lineage"]

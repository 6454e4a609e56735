"""The merge a model folder declares: mergekit writes ``mergekit_config.yml`` beside the merged weights.

A merge made by TIES, DARE or Model Breadcrumbs is no weighted sum of its parents (values trimmed or dropped,
signs elected), so the weights alone do not show it (:mod:`modelatlas.lineage.merges` finds weighted sums only);
the folder's own record does. Read with ``yaml.safe_load`` (no object construction), checked, and reduced to
the method, the base model and the models merged (``models:`` or ``slices: - sources:``), each with its
``weight`` where one number gives it. A file that is not such a config is reported, never the end of a run.
Time O(size of the file).
"""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIG = "mergekit_config.yml"
_MAX_BYTES = 1 << 20  # a mergekit config is a few hundred bytes


def declared_merge(folder: str | Path) -> dict | None:
    """``{"method": str, "base": str | None, "models": [str], "weights": [float | None], "file": str}`` of the
    ``mergekit_config.yml`` in ``folder`` (None without one); ``{"file": ..., "problem": why}`` for a file that
    cannot be read as one (not YAML, no ``merge_method``, no models)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > _MAX_BYTES:
            return {"file": str(path), "problem": f"over {_MAX_BYTES} bytes: no mergekit config"}
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        return {"file": str(path), "problem": f"not readable as YAML ({' '.join(str(e).split())[:120]})"}
    return _parsed(path, data)


def _parsed(path: Path, data) -> dict:
    """The declared merge of a config's parsed ``data`` (see :func:`declared_merge`)."""
    if not isinstance(data, dict) or not isinstance(data.get("merge_method"), str):
        return {"file": str(path), "problem": "no merge_method: not a mergekit config"}
    entries = [e for e in data.get("models") or [] if isinstance(e, dict)]
    for piece in data.get("slices") or []:
        entries += [e for e in (piece.get("sources") or []) if isinstance(e, dict)] if isinstance(piece, dict) else []
    models, weights = [], []
    for e in entries:
        name = e.get("model")
        if isinstance(name, str) and name not in models:
            models.append(name)
            weight = (e.get("parameters") or {}).get("weight") if isinstance(e.get("parameters"), dict) else None
            weights.append(float(weight) if isinstance(weight, (int, float)) and not isinstance(weight, bool) else None)
    base = data.get("base_model") if isinstance(data.get("base_model"), str) else None
    if not models and base is None:
        return {"file": str(path), "problem": "no models: not a mergekit config"}
    return {"method": data["merge_method"], "base": base, "models": models, "weights": weights, "file": str(path)}

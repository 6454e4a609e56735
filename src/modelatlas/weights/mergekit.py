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
_MAX_ENTRIES = 10_000  # model entries, counted in every slice; a real config lists a few
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's when there: 1 MB in well under a second


def declared_merge(folder: str | Path) -> dict | None:
    """``{"method": str, "base": str | None, "models": [str], "weights": [float | None], "file": str}`` of the
    ``mergekit_config.yml`` in ``folder`` (None without one); ``{"file": ..., "problem": why}`` for a file that
    cannot be read as one (not YAML, nested too deeply, no ``merge_method``, no models, over
    :data:`_MAX_ENTRIES` model entries)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > _MAX_BYTES:
            return {"file": str(path), "problem": f"over {_MAX_BYTES} bytes: no mergekit config"}
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)  # builds no objects
    except RecursionError:  # [[[[...]]]] 5,000 deep: it ended the run that read the folder
        return {"file": str(path), "problem": "not readable as YAML (nested too deeply)"}
    except (OSError, ValueError, yaml.YAMLError) as e:
        return {"file": str(path), "problem": f"not readable as YAML ({' '.join(str(e).split())[:120]})"}
    return _parsed(path, data)


def _parsed(path: Path, data) -> dict:
    """The declared merge of a config's parsed ``data`` (see :func:`declared_merge`). Time O(entries), at most
    :data:`_MAX_ENTRIES` of them: YAML aliases let a few kB list one list of sources in every slice."""
    if not isinstance(data, dict) or not isinstance(data.get("merge_method"), str):
        return {"file": str(path), "problem": "no merge_method: not a mergekit config"}
    models, weights, seen = [], [], set()  # (a set: a list's `in` made 20,000 models take 16 s)
    for n, e in enumerate(_entries(data)):
        if n == _MAX_ENTRIES:
            return {"file": str(path), "problem": f"over {_MAX_ENTRIES} model entries: not a mergekit config"}
        name = e.get("model")
        if isinstance(name, str) and name not in seen:
            seen.add(name)
            models.append(name)
            weights.append(_weight(e.get("parameters")))
    base = data.get("base_model") if isinstance(data.get("base_model"), str) else None
    if not models and base is None:
        return {"file": str(path), "problem": "no models: not a mergekit config"}
    return {"method": data["merge_method"], "base": base, "models": models, "weights": weights, "file": str(path)}


def _entries(data: dict):
    """The model entries (dicts) of ``models:`` and of each ``slices: - sources:``; a value of another type (a
    number where a list belongs: a TypeError ended the run) has none."""
    yield from (e for e in _items(data.get("models")) if isinstance(e, dict))
    for piece in _items(data.get("slices")):
        if isinstance(piece, dict):
            yield from (e for e in _items(piece.get("sources")) if isinstance(e, dict))


def _items(value) -> list:
    return value if isinstance(value, list) else []


def _weight(parameters) -> float | None:
    """An entry's ``parameters: weight`` as a float, None where it is none (a list, a string, a number past
    float's range: ``float(10**400)`` raised OverflowError and ended the run)."""
    weight = parameters.get("weight") if isinstance(parameters, dict) else None
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        return None
    try:
        return float(weight)
    except OverflowError:
        return None

"""The labelled models a zoo manifest gives ProbeX to learn from: the fine-tuned models holding the task key
(``classes`` or ``label``), each target checked, grouped by tree (trees of too few left out), stored as full
weights; and their targets. No weights are read. O(models in the manifest).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from modelatlas.errors import ManifestError
from modelatlas.zoo.manifest import Manifest, ModelRecord


def _file(manifest: Manifest) -> Path:
    """The manifest's file, as every error here names it (``manifest.json`` in its folder when built in memory)."""
    return manifest.source or manifest.root / "manifest.json"


def task_records(manifest: Manifest, task: str) -> list[ModelRecord]:
    """The fine-tuned models (a parent) holding ``task``'s key, each target checked; raises naming the file."""
    key = "classes" if task == "classes" else "label"
    recs = [m for m in manifest.models if m.parent is not None and key in m.task]
    if not recs:  # labelled roots: a hand-written manifest with "parent": null was told no model had the key
        roots = [repr(m.name) for m in manifest.models if key in m.task]
        why = (f"; {len(roots)} model(s) have it ({', '.join(roots[:3])}{', ...' * (len(roots) > 3)}) but \"parent\": "
               "null, as roots, and only fine-tuned models are learned from: give each its parent (the base model it "
               "was fine-tuned from, listed in the manifest as a root)") if roots else ""
        raise ManifestError(f"{_file(manifest)}: no fine-tuned model has task "
                            f"key {key!r} (needed by --task {task}){why}")
    for m in recs:
        _check_target(manifest, m, key)
    return recs


MAX_CLASSES = 100_000  # class indices a multi-hot target may hold: a typo'd 10**8 asked for a (models x 10**8) table


def _check_target(manifest: Manifest, m: ModelRecord, key: str) -> None:
    """A model's ``classes`` are class indices (ints >= 0) and its ``label`` a non-empty string; a hand-written
    manifest's "3", 2.5 or true failed deep in training with a traceback, and a -1 was taken as the last class."""
    value = m.task[key]
    if key == "classes":
        ok = isinstance(value, list) and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < MAX_CLASSES
                                             for c in value)
        want = f"a list of class indices (integers from 0 to {MAX_CLASSES - 1:,})"
    else:
        ok, want = isinstance(value, str) and bool(value.strip()), "a non-empty string (the class prompt)"
    if not ok:
        raise ManifestError(f"{_file(manifest)}: model {m.name!r} task {key!r} must be {want}; got {value!r:.80}")


def class_names(records: list[ModelRecord], manifest: Manifest | None = None) -> list[str]:
    """The names of the classes ``records`` index: the manifest's ``config.class_names`` where it gives them
    (checked), else those of the records' dataset when it has as many, else the indices as strings."""
    n = 1 + max(c for m in records for c in m.task["classes"])
    given = manifest.config.get("class_names") if manifest is not None else None
    if given is not None:
        return _checked_names(manifest, given, n)
    try:
        from modelatlas.data.registry import load_dataset

        names = load_dataset(records[0].dataset, "test").classes if records[0].dataset else []
    except Exception:  # noqa: BLE001 - names are cosmetic; fall back to indices
        names = []
    return list(names) if len(names) == n else [str(i) for i in range(n)]


def _checked_names(manifest: Manifest, given: object, n: int) -> list[str]:
    """``config.class_names`` of a hand-written manifest: a list of at least ``n`` (the largest class index + 1)
    non-empty strings; raises naming the file and the key."""
    if not (isinstance(given, list) and all(isinstance(c, str) and c.strip() for c in given) and len(given) >= n):
        raise ManifestError(f"{_file(manifest)}: config 'class_names' must be a list of {n} or more non-empty strings (one "
                            f"per class index, the models' classes going up to {n - 1}); got {given!r:.80}")
    return list(given)


def targets(records: list[ModelRecord], task: str, n_classes: int):
    if task == "classes":
        y = np.zeros((len(records), n_classes), dtype=np.float32)
        for i, m in enumerate(records):
            y[i, m.task["classes"]] = 1
        return y
    return np.array([m.task["label"] for m in records])


def group_by_tree(records: list[ModelRecord], min_models: int, source) -> dict[str, list[ModelRecord]]:
    by_tree: dict[str, list[ModelRecord]] = {}
    for m in records:
        by_tree.setdefault(m.tree, []).append(m)
    sizes = ", ".join(f"{t}: {len(ms)}" for t, ms in sorted(by_tree.items())[:10]) + (", ..." if len(by_tree) > 10 else "")
    by_tree = {t: ms for t, ms in sorted(by_tree.items()) if len(ms) >= min_models}
    if not by_tree:
        raise ManifestError(f"{source}: no tree has >= {min_models} labelled models to train an expert on ({sizes})")
    return by_tree


def left_out(records: list[ModelRecord], by_tree: dict[str, list[ModelRecord]]) -> dict[str, int]:
    """Labelled models of each tree given no expert (fewer than ``min_models``), in tree order."""
    return {t: n for t, n in sorted(Counter(m.tree for m in records).items()) if t not in by_tree}


def check_full_weights(manifest: Manifest, by_tree: dict[str, list[ModelRecord]]) -> None:
    """Refuse models stored as LoRA adapters: each would be read as its update B A alone and learned beside
    full models' layers, which no merged model resembles. A zoo marks them (``storage``: ``atlas zoo merge``
    writes them merged); a hand-written manifest of one's own adapters does not, and they were learned as
    updates without a word (the same adapters were then routed to no tree with --base): they are found on disk.
    O(models) file checks."""
    from modelatlas.weights.peft_lora import is_adapter_folder

    records = [m for ms in by_tree.values() for m in ms]
    marked = [m.name for m in records if m.storage == "adapter"]
    adapters = marked or [m.name for m in records if is_adapter_folder(manifest.root / m.path)]
    if adapters:
        shown = ", ".join(adapters[:3]) + (", ..." if len(adapters) > 3 else "")
        what, fix = (("stored as LoRA adapters on their parents", f"`atlas zoo merge {manifest.root} --out DIR` writes "
                      "their full weights: train on DIR") if marked else
                     ("PEFT LoRA adapters (adapter_config.json)", "save each merged onto its base (PEFT: "
                      "merge_and_unload(), then save_pretrained) and list the merged models"))
        raise ManifestError(f"{_file(manifest)}: {len(adapters)} models ({shown}) "
                            f"are {what}, and experts learn full models' layers; {fix}")


def tree_paths(manifest: Manifest, by_tree: dict[str, list[ModelRecord]]) -> dict[str, list[Path]]:
    """Each tree's model paths. One not on disk is refused naming the record, and that paths are relative to
    the manifest's folder: a hand-written ``labels.json`` with paths from the current folder said only
    ``lab/own/ft0.safetensors: no such file or folder``. O(models) file checks."""
    for m in (m for ms in by_tree.values() for m in ms):
        where = manifest.root / m.path
        if not where.exists() and not where.is_symlink():
            here = (f"; {m.path} is there from the current folder: write the paths relative to {manifest.root}, "
                    "or absolute") if Path(m.path).exists() else ""
            raise ManifestError(f"{_file(manifest)}: model {m.name!r}: {where} not "
                                f"found (its path {m.path!r} is relative to the manifest's folder){here}")
    return {t: [manifest.root / m.path for m in ms] for t, ms in by_tree.items()}

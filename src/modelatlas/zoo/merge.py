"""A zoo stored as LoRA adapters, written again with every model's full weights (``atlas zoo merge``).

An adapter-stored model (``storage="adapter"``) holds only its update dW = (alpha / r) B A on its parent.
Its weights, the model that was trained and evaluated, are the parent's full weights plus dW (the parent
itself merged when it is an adapter too). Lineage recovery reads weights files and never follows an
adapter's ``base_model_name_or_path``, so a zoo whose adapters sit on other adapters cannot be compared
as it is stored (one ``--base`` serves adapters of one base model). :func:`merge_zoo` writes the zoo as
``atlas zoo make --storage merged`` lays it out: a folder per model with ``model.safetensors``,
``config.json`` and ``zoo_record.json``, and a manifest whose records keep name, parent, task and training
record, with the new weights' digests. Time O(N P depth), memory O(P depth), for N models of P weights.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

from modelatlas.atomic import check_out_folder
from modelatlas.errors import ConfigError, ManifestError
from modelatlas.progress import Progress, resolve
from modelatlas.zoo.manifest import Manifest
from modelatlas.zoo.store import (
    RECORD,
    clear_folder,
    load_state,
    save_full,
    weights_digest,
    write_record,
)


def merge_zoo(manifest: Manifest, out: str | Path, progress: Progress | None = None) -> Manifest:
    """Write the zoo of ``manifest`` to the new or empty folder ``out`` with full weights for every model
    (adapters merged onto their parents, recursively; full models copied as they are) and return the new
    manifest, saved last as ``out/manifest.json``. An ``out`` holding an earlier merge of this zoo
    (interrupted or not) is written again. Raises ConfigError for an ``out`` that is the zoo itself or holds
    other files, ManifestError for a model that is not a finished zoo model folder or whose weights changed
    since the build (nothing is written then)."""
    out = Path(out)
    config = _merged_config(manifest.config)
    arch = config.get("arch_config")
    fp = _fingerprint(config)
    _check_out(manifest, out, fp)
    _check_unchanged(manifest)
    for m in manifest.models:  # before anything is written
        if (manifest.root / m.path).is_file():
            raise ManifestError(f"{manifest.path_of(m.name)}: model {m.name!r} is a single weights file, not a "
                                "zoo model folder; only zoos built by `atlas zoo make` can be merged")
    records = []
    for m in resolve(progress)(manifest.models, total=len(manifest), desc="merging models"):
        folder = out / m.path  # read by path too: a model renamed in the manifest keeps its folder
        folder.mkdir(parents=True, exist_ok=True)
        clear_folder(folder)  # what a killed merge left: temporary files, an unfinished model's files
        state = load_state(manifest.root, m.path)
        save_full(folder, state, arch)  # (a bfloat16 merged model stays one)
        rec = replace(m, storage="full", sha256=weights_digest(folder / "model.safetensors"))
        write_record(folder, asdict(rec), fp)
        records.append(rec)
    merged = Manifest(records, config, out)
    merged.save(out / "manifest.json")
    return merged


def _check_unchanged(manifest: Manifest) -> None:
    """Every weights file still has the digest the manifest recorded: a file overwritten since the build was
    merged as it was, and the merged manifest's new digests then vouched for it. Reads each file once."""
    from modelatlas.zoo.store import verify_zoo

    changed = [name for name, s in verify_zoo(manifest).items() if s == "changed"]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ManifestError(f"{manifest.root}: {', '.join(changed[:3])}{more} changed since the zoo was built (weights "
                            f"that differ from the manifest's digests); see `atlas zoo verify {manifest.root}`, and "
                            "rebuild them with `atlas zoo make`")


def _check_out(manifest: Manifest, out: Path, fp: str) -> None:
    """``out`` must be new or empty, and neither the zoo's own folder (its adapters would be overwritten) nor
    a folder inside it."""
    real, root = Path(os.path.realpath(out)), Path(os.path.realpath(manifest.root))
    if real == root:
        raise ConfigError(f"{out}: is the zoo's own folder; write the merged zoo to another folder")
    if root in real.parents:  # the zoo would hold it: `atlas zoo verify` then fails on an extra folder
        raise ConfigError(f"{out}: is inside the zoo {manifest.root}; write the merged zoo to a folder outside it")
    check_out_folder(out, f"{out}:", "give a new or empty folder for the merged zoo")
    if out.is_dir() and not _earlier_merge(manifest, out):
        raise ConfigError(f"{out}: is not empty; give a new or empty folder for the merged zoo")
    if out.is_dir() and not _same_zoo(manifest, out, fp):
        raise ConfigError(f"{out}: holds another zoo (its models' records differ from this zoo's); give a new "
                          "or empty folder for the merged zoo")


def _earlier_merge(manifest: Manifest, out: Path) -> bool:
    """True when ``out`` holds nothing but what a merge of this zoo writes (an interrupted or finished one,
    rewritten by a rerun): the manifest and folders named like its models, holding zoo model files only."""
    from modelatlas.zoo.store import MODEL_FILES

    names = {Path(m.path).parts[0] for m in manifest.models if Path(m.path).parts}
    for entry in out.iterdir():
        if entry.name == "manifest.json" and entry.is_file():
            continue
        if entry.name not in names or not entry.is_dir():
            return False
        if any(f.name not in MODEL_FILES and not f.name.endswith(".tmp") for f in entry.iterdir()):
            return False
    return True


def _same_zoo(manifest: Manifest, out: Path, fp: str) -> bool:
    """True when every model record and manifest already in ``out`` is one a merge of this zoo writes: the same
    config (fingerprint) and, per model, the same name, parent, tree, method and task (not the digests, nor the
    seconds a rebuilt model took). A zoo of the same shape built from another config or seed has the same
    folder names, and overwriting it would lose its weights. O(N) small reads."""
    import json

    want = {m.name: _identity(asdict(m)) for m in manifest.models}
    found = []
    try:
        if (out / "manifest.json").is_file():
            data = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            if data.get("config") != _merged_config(manifest.config):
                return False
            found += data["models"]
        for m in manifest.models:
            if (out / m.path / RECORD).is_file():
                data = json.loads((out / m.path / RECORD).read_text(encoding="utf-8"))
                if data.get("fingerprint") != fp:
                    return False
                found.append(data.get("record"))
    except (OSError, ValueError, AttributeError, TypeError, KeyError, RecursionError):
        return False
    return all(isinstance(r, dict) and want.get(r.get("name")) == _identity(r) for r in found)


def _identity(record: dict) -> dict:
    """What makes a zoo model the one it is: its place in the zoo and its task (its results and timings may
    differ between two builds of one config)."""
    return {k: record.get(k) for k in ("name", "parent", "tree", "method", "task")}


def _merged_config(config: dict) -> dict:
    """The config a merge writes: the zoo's, with storage "merged" (a dict without a storage key kept as is)."""
    return {**config, "storage": "merged"} if "storage" in config else dict(config)


def _fingerprint(config: dict) -> str:
    """The config fingerprint ``atlas zoo make`` would write for ``config`` ("" when it is not a zoo config):
    rerunning `atlas zoo make` with the merged config then reuses these folders."""
    from modelatlas.zoo.builder import fingerprint
    from modelatlas.zoo.config import ZooConfig

    try:
        return fingerprint(ZooConfig.from_dict(config))
    except (ConfigError, TypeError, ValueError, KeyError):
        return ""


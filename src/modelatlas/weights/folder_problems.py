"""Why a folder that looks like one model is none that a reader opens: the reason :func:`~.registry.open_checkpoint`
gives for it, so that inside a folder of models it is reported and skipped, not left out without a word (a
download without its weights, a hub cache entry, shards without their index, a folder named like a weights file).
Moved out of :mod:`.registry` (session 39), which imports :func:`folder_problem` from here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modelatlas.weights.base import _file_stem, hub_repo_id, named_by_folder

_MODEL_FOLDER_MARKERS = ("config.json", "adapter_config.json")  # transformers, PEFT
# the files a library's model folder holds (transformers, PEFT): one of them a folder is no layout of theirs
_LIBRARY_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors",
                  "adapter_model.bin", "config.json")
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")  # model-00001-of-00002.safetensors


def orphan_shard(path: Path) -> bool:
    """A shard of a sharded model whose folder has no ``*.index.json`` (copied with ``*.safetensors``): read
    alone, each shard was a model of its own, and one model became several trees."""
    return bool(_SHARD.search(path.name)) and path.is_file() and not any(
        p.is_file() for p in path.parent.glob("*.index*.json"))  # (a folder so named is no index)


def _broken_weights_link(path: Path) -> bool:
    """A link named like a weights file or shard index whose target does not exist."""
    named = _file_stem(path.name) is not None or path.name.endswith(".index.json")
    return named and path.is_symlink() and not path.exists()


def _variant_problem(path: Path) -> str | None:
    """Why a folder of two variants is no model (:func:`.hf_folder.find_layout` opens one), else None."""
    from modelatlas.weights.hf_folder import LAYOUTS, variant_files

    found = variant_files(path)
    if not found:
        return None
    names = ", ".join(name for name, _, _ in found)
    return f"holds the variants {names} and no {LAYOUTS[found[0][2]][0]}: give one of the files"


def folder_problem(path: Path) -> str | None:
    """Why folder ``path`` looks like one model that no reader opens (a download without its weights, a hub cache
    entry, an export in another layout such as ``run/model.onnx`` opened as a folder, a folder named like a
    weights file), else None: the reason :func:`~.registry.open_checkpoint` gives for it. Inside a folder of
    models such a folder was left out without a word; now it is reported and skipped. Time O(files in it)."""
    if not path.is_dir():
        return None
    repo = hub_repo_id(path.name)
    if repo is not None and (path / "snapshots").is_dir():  # huggingface_hub's cache layout
        return (f"a Hugging Face cache entry, not a model folder; give its hub id {repo} (with HF_HUB_CACHE="
                f"{path.parent} if that is not your cache) or one of its snapshots/<commit> folders")
    broken = sorted(c for c in path.iterdir() if _broken_weights_link(c))
    if broken:  # a hub cache snapshot whose blob was pruned: "no weights file" sent users looking for a typo
        return (f"{broken[0].name} is a link to {os.readlink(broken[0])}, which does not exist (a blob deleted "
                "from the Hugging Face cache, or a copy that kept the link): fetch the model again")
    return folder_in_place(path) or _variant_problem(path) or _layout_problem(path)


def folder_in_place(path: Path) -> str | None:
    """Why model folder ``path`` is none: a folder where one of a library's files belongs (its index, config or
    weights); else None. It said "unknown checkpoint format", "no weights file", or (a PEFT folder) its
    ``adapter_model.safetensors`` was read as a model of its own: none named the file."""
    placed = next((name for name in _LIBRARY_FILES if (path / name).is_dir()), None)
    return None if placed is None else f"{placed} is a folder, not a file (a copy or an unpack gone wrong?)"


def _layout_problem(path: Path) -> str | None:
    """:func:`folder_problem`'s reasons from the files in folder ``path``: shards without their index, a library's
    file in a folder of no library's layout, a folder named like a weights file, a marker without weights."""
    from modelatlas.weights.nested import holds_models
    from modelatlas.weights.registry import is_model

    shards = sorted(c.name for c in path.iterdir() if orphan_shard(c))
    if shards:
        return (f"holds the shards {', '.join(shards[:2])}{', ...' if len(shards) > 2 else ''} of one model but no "
                "*.index.json that maps tensors to them (copy the index too); each shard alone is no model")
    files = sorted(c.name for c in path.iterdir() if named_by_folder(c) and is_model(c))
    if files:
        return (f"a folder holding {files[0]}, but a folder is read as one model only in the Hugging Face or PEFT "
                f"layout (model.safetensors, pytorch_model.bin, adapter_model.*); give the file {path / files[0]}")
    if _file_stem(path.name) is not None and not holds_models(path):  # zoo/a.safetensors/ where the file was
        return (f"a folder, not a {path.suffix} file as its name says (a copy or an unpack gone wrong?); give the "
                "weights file itself")
    marker = next((m for m in _MODEL_FOLDER_MARKERS if (path / m).is_file()), None)
    if marker is None:
        return None
    return (f"has {marker} but no weights file (model.safetensors, pytorch_model.bin, their .index.json shard "
            "index, or adapter_model.safetensors / .bin): an unfinished download or copy?")

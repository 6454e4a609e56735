"""Hugging Face model folders: ``model.safetensors``, sharded ``model.safetensors.index.json``,
``pytorch_model.bin`` and sharded ``pytorch_model.bin.index.json``.

A sharded folder's index maps every tensor name to the shard file that holds it (``weight_map``). Opening the
folder checks that every listed shard exists (naming the missing one); reading a tensor opens only its shard.
Shards are read by the single-file readers (safetensors, or the safe ``weights_only`` torch loader), so their
header checks and the pickle security policy apply unchanged. The model's name is the folder's name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from modelatlas.errors import CheckpointError, TensorNotFoundError
from modelatlas.weights.base import Checkpoint, TensorInfo, error_line, folder_name, variant_of
from modelatlas.weights.registry import register_format
from modelatlas.weights.safetensors_format import SafetensorsCheckpoint, _unique_keys
from modelatlas.weights.torch_pickle import TorchPickleCheckpoint

# (file name, is an index), in order of preference.
LAYOUTS = (
    ("model.safetensors", False),
    ("model.safetensors.index.json", True),
    ("pytorch_model.bin", False),
    ("pytorch_model.bin.index.json", True),
)



def open_weight_file(path: Path) -> Checkpoint:
    """Open one shard or single weight file with the reader its extension calls for."""
    if path.name.endswith(".safetensors"):
        return SafetensorsCheckpoint(path)
    return TorchPickleCheckpoint(path)


def read_weight_map(index: Path) -> dict[str, str]:
    """Parse and validate ``*.index.json`` (:func:`parse_weight_map`); returns tensor name -> shard file name.

    Every shard must be a plain file name inside the index's folder (no ``..``) and must exist.
    """
    try:
        weight_map = parse_weight_map(index, index.read_bytes())
    except OSError as e:
        raise CheckpointError(index, f"corrupt shard index: {error_line(e)}") from e
    for shard in dict.fromkeys(weight_map.values()):
        path = index.parent / shard
        if path.is_symlink() and not path.exists():  # a hub cache blob deleted: the link is there, its file not
            raise CheckpointError(index, f"shard {shard!r} is a link to {os.readlink(path)}, which does not exist "
                                         "(fetch the model again)")
        if not path.is_file():
            raise CheckpointError(index, f"shard {shard!r} listed in the index is missing from {index.parent}")
    return weight_map


def parse_weight_map(index: str | Path, raw: bytes) -> dict[str, str]:
    """Tensor name -> shard file name from the bytes ``raw`` of shard index ``index`` (a path or URL, named in
    errors), each shard a plain file name (no folder, no ``..``). Shared by the local and the HTTP reader."""
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError as e:
        raise CheckpointError(index, "corrupt shard index: JSON nested too deeply") from e
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, a 5,000-digit integer, a repeated key
        raise CheckpointError(index, f"corrupt shard index: {error_line(e)}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index, "corrupt shard index: no 'weight_map' object of tensor name -> shard file")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(index, f"bad shard file {shard!r} for tensor {tensor!r}: must be a file name "
                                         "in the same folder")
    return weight_map


class HFFolderCheckpoint(Checkpoint):
    """A Hugging Face model folder (single file or sharded), read one shard at a time."""

    format = "hf-folder"

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(path, name if name is not None else folder_name(Path(path)))
        layout = find_layout(self.path)
        if layout is None:
            raise CheckpointError(self.path, "not a Hugging Face model folder (no model.safetensors, "
                                             "pytorch_model.bin or their .index.json)")
        self.weight_file = self.path / layout[0]
        self._shards: dict[str, Checkpoint] = {}
        self._weight_map: dict[str, str] | None = read_weight_map(self.weight_file) if layout[1] else None
        if self._weight_map is None:
            self._shard(self.weight_file.name).tensors()  # validate the header now, not at the first read

    def _shard(self, file_name: str) -> Checkpoint:
        if file_name not in self._shards:
            self._shards[file_name] = open_weight_file(self.path / file_name)
        return self._shards[file_name]

    def _infos(self) -> list[TensorInfo]:
        if self._weight_map is None:
            return self._shard(self.weight_file.name).tensors()
        infos: list[TensorInfo] = []
        for shard in dict.fromkeys(self._weight_map.values()):  # shards in index order, each opened once
            ck = self._shard(shard)
            wanted = {k for k, v in self._weight_map.items() if v == shard}
            missing = sorted(wanted - set(ck.keys()))
            if missing:
                raise CheckpointError(self.weight_file, f"the index puts tensor {missing[0]!r} in shard "
                                                        f"{shard!r}, which has no such tensor")
            infos.extend(t for t in ck.tensors() if t.name in wanted)
        return infos

    def tensor_names(self) -> list[str]:
        """The names the index lists (no shard opened), or the single file's."""
        return list(self._weight_map) if self._weight_map is not None and self._info_cache is None else self.keys()

    def files(self) -> list[Path]:
        """The weight file, or the index and its shards: not a copy of the weights in another format beside
        them (``pytorch_model.bin`` next to ``model.safetensors``), nor the tokenizer's files."""
        shards = [] if self._weight_map is None else [self.path / s for s in dict.fromkeys(self._weight_map.values())]
        return [self.weight_file, *shards]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor, opening only the shard the index puts it in."""
        return self._shard(self._shard_of(name)).read(name)

    def _read(self, name: str) -> torch.Tensor:
        shard = self.weight_file.name if self._weight_map is None else self._weight_map[name]
        return self._shard(shard).read(name)

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`~.base.Checkpoint.read_rows` from the shard that holds ``name`` (a safetensors shard reads only
        those rows' bytes)."""
        return self._shard(self._shard_of(name)).read_rows(name, rows)

    def _shard_of(self, name: str) -> str:
        """The file holding tensor ``name``, from the index alone while no shard header was read; a
        TensorNotFoundError for a name it does not hold."""
        if self._weight_map is not None and self._info_cache is None:
            if name not in self._weight_map:
                raise TensorNotFoundError(self.path, f"no tensor named {name!r} ({len(self._weight_map)} "
                                                     "tensors in the index)")
        else:
            self.info(name)
        return self.weight_file.name if self._weight_map is None else self._weight_map[name]

    def prefetch(self, name: str) -> None:
        """Prefetch ``name`` from the shard that holds it (a no-op for unknown names)."""
        shard = self.weight_file.name if self._weight_map is None else self._weight_map.get(name)
        if shard is not None:
            try:
                self._shard(shard).prefetch(name)
            except CheckpointError:
                pass  # a bad shard is reported by the read that follows, not by a hint

    def close(self) -> None:
        for ck in self._shards.values():
            ck.close()
        self._shards.clear()


def find_layout(path: Path) -> tuple[str, bool] | None:
    """The first HF weight layout present in folder ``path`` (file name, is an index), or None. Without one,
    the layout of the folder's only variant (``save_pretrained(variant="fp16")``: ``model.fp16.safetensors``,
    ``model.safetensors.index.fp16.json``... beside ``config.json``); None when it holds two (which one?)."""
    if not path.is_dir():
        return None
    found = next((lay for lay in LAYOUTS if (path / lay[0]).is_file()), None)
    if found is not None:
        return found
    variants = variant_files(path)
    if len({variant for _, variant, _ in variants}) != 1:
        return None
    name, _, rank = min(variants, key=lambda v: v[2])  # in LAYOUTS' order
    return name, LAYOUTS[rank][1]


def variant_files(path: Path) -> list[tuple[str, str, int]]:
    """(file name, variant, rank in LAYOUTS) of the variant weight files in model folder ``path``, sorted by
    name; none without the ``config.json`` that save_pretrained writes (a folder of models holding a
    ``model.final.safetensors`` is not one model)."""
    if not (path / "config.json").is_file():
        return []
    found = []
    for child in sorted(path.iterdir()):
        for rank, (name, _) in enumerate(LAYOUTS):
            variant = variant_of(child.name, name)
            if variant is not None and child.is_file():
                found.append((child.name, variant, rank))
    return found


def is_hf_folder(path: Path) -> bool:
    return find_layout(path) is not None


register_format("hf-folder", is_hf_folder, HFFolderCheckpoint)

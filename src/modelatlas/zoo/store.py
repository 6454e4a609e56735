"""Zoo model folders on disk: writing them (atomically, ``zoo_record.json`` last) and reading weights back.

A model folder is either a Hugging Face-style folder (``model.safetensors`` + ``config.json``) or a
PEFT-style LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, base = the
parent's folder beside it). ``zoo_record.json`` (the manifest record plus the config fingerprint) is
written last: its presence marks a finished model, which is what resuming checks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from modelatlas.atomic import atomic_save_tensors, atomic_write_json, read_tensors
from modelatlas.errors import CheckpointError, ManifestError

RECORD = "zoo_record.json"
MODEL_FILES = ("model.safetensors", "config.json", "adapter_model.safetensors", "adapter_config.json", RECORD)
_CLASS_NAMES = {"mlp": "AtlasMLP", "cnn": "AtlasCNN", "vit": "ViTForImageClassification"}


def hf_config(arch: dict, dtype: str = "float32") -> dict:
    """``config.json`` for an architecture config: HF-style keys plus the atlas config itself."""
    cfg = {"architectures": [_CLASS_NAMES[arch["arch"]]], "model_type": f"atlas-{arch['arch']}",
           "num_labels": arch["num_classes"], "torch_dtype": dtype, "atlas_arch": arch}
    if arch["arch"] == "vit":
        cfg.update(model_type="vit", hidden_size=arch["hidden"], num_hidden_layers=arch["n_layers"],
                   num_attention_heads=arch["n_heads"], intermediate_size=arch["intermediate"],
                   image_size=arch["input_shape"][1], patch_size=arch["patch_size"],
                   num_channels=arch["input_shape"][0], hidden_act="gelu", qkv_bias=True)
    return cfg


def clear_folder(folder: Path) -> None:
    """Remove a model folder's known files and temporary files a killed build left (a rebuild must not
    leave a stale format behind)."""
    for name in MODEL_FILES:
        (folder / name).unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def save_full(folder: Path, state: dict[str, torch.Tensor], arch: dict | None) -> None:
    """A Hugging Face-style model folder: ``model.safetensors`` and, for an architecture config (a manifest
    written by ``make_zoo`` has one), ``config.json`` (``torch_dtype``: the weights' own, :func:`float_dtype`)."""
    atomic_save_tensors(folder / "model.safetensors", state, metadata={"format": "pt"})
    if isinstance(arch, dict) and "arch" in arch:
        atomic_write_json(folder / "config.json", hf_config(arch, float_dtype(state)))


def float_dtype(state: dict[str, torch.Tensor]) -> str:
    """The dtype of a state dict's float tensors as ``config.json`` names it ("float32" when none or mixed)."""
    kinds = {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else "float32"


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    atomic_save_tensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    atomic_write_json(folder / "adapter_config.json", config)


def write_record(folder: Path, record: dict, fingerprint: str) -> None:
    atomic_write_json(folder / RECORD, {"fingerprint": fingerprint, "record": record})


def read_record(folder: Path) -> dict | None:
    """The finished model's ``{"fingerprint", "record"}``, or None when the folder is not finished."""
    path = folder / RECORD
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rec = data["record"]  # a list or a number (hand-edited) has none
    except (OSError, ValueError, RecursionError, TypeError, KeyError):
        return None  # an unreadable record counts as unfinished: the model is rebuilt
    if not isinstance(rec, dict) or not isinstance(data.get("fingerprint", ""), str):
        return None
    return data if weights_file(folder, rec.get("storage", "full")).exists() else None


def valid_record(folder: Path, rec: dict) -> bool:
    """Whether ``rec`` (of ``read_record``) has a manifest record's keys and types: one of this zoo (the same
    fingerprint) that has not is rebuilt, and cannot be read. O(keys)."""
    from modelatlas.zoo.manifest import _record

    try:
        _record(folder / RECORD, 0, rec)
    except ManifestError:
        return False
    return True


def weights_file(folder: Path, storage: str) -> Path:
    """The file holding a zoo model's weights: the adapter's for adapter storage, else the full state dict."""
    return folder / ("adapter_model.safetensors" if storage == "adapter" else "model.safetensors")


def weights_digest(path: Path) -> str:
    """SHA-256 of a weights file, read in 1 MiB blocks. Two builds of one zoo config are the same zoo when
    every model's digest matches (training is bit-reproducible on one machine, not across CPUs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_zoo(manifest) -> dict[str, str]:
    """Model name -> "ok", "changed" (its weights differ from the manifest's digest), "missing" (no weights
    file), "unrecorded" (a manifest written before digests) or "not built" (planned by the manifest's
    config but not in it: an interrupted build). Reads every weights file once."""
    from modelatlas.zoo.plan import planned_names

    if not manifest.models:
        raise ManifestError(f"{manifest.source or manifest.root}: the manifest lists no models; "
                            "build the zoo with `atlas zoo make`")
    out = {}
    for m in manifest.models:
        path = manifest.root / m.path  # a weights file itself (probex families), or a model folder
        path = path if path.is_file() else weights_file(path, m.storage)
        if not path.is_file():
            out[m.name] = "missing"
        elif not m.sha256:
            out[m.name] = "unrecorded"
        else:
            out[m.name] = "ok" if weights_digest(path) == m.sha256 else "changed"
    folders = {Path(m.path).parts[0] for m in manifest.models if Path(m.path).parts}  # a model renamed by hand
    for name in planned_names(manifest.config) or []:  # keeps its folder: built, under another name
        if name not in folders:
            out.setdefault(name, "not built")
    return out


def extra_files(manifest) -> list[str]:
    """Paths under the zoo folder (relative, sorted) that no manifest record accounts for: a file in a model
    folder other than the ones a zoo model is made of, or a file or folder beside the model folders (an
    extra weights file there would be read as a model of the zoo). O(files)."""
    from modelatlas.zoo.plan import planned_names

    root = manifest.root
    # a planned model's folder is not extra, even unfinished (an interrupted build)
    known = {manifest.source.name if manifest.source else "manifest.json", *(planned_names(manifest.config) or [])}
    known |= {Path(m.path).parts[0] for m in manifest.models if Path(m.path).parts}
    extra = [p.name + "/" * p.is_dir() for p in root.iterdir() if p.name not in known] if root.is_dir() else []
    for m in manifest.models:
        folder = root / m.path
        if folder.is_dir():
            extra += [str(Path(m.path) / p.name) for p in folder.iterdir() if p.name not in MODEL_FILES]
    return sorted(extra)


def compare_digests(manifest, other) -> dict[str, str]:
    """Model name -> "same", "different", "only here", "only there" or "unrecorded" between two manifests
    of one config (e.g. the same zoo built on two machines); no file is read."""
    theirs = {m.name: m.sha256 for m in other.models}
    out = {}
    for m in manifest.models:
        if m.name not in theirs:
            out[m.name] = "only here"
        elif not m.sha256 or not theirs[m.name]:
            out[m.name] = "unrecorded"
        else:
            out[m.name] = "same" if m.sha256 == theirs[m.name] else "different"
    for name in theirs:
        out.setdefault(name, "only there")
    return out


def config_differences(config: dict, other: dict) -> list[str]:
    """'key a here, b there' for each config key whose values differ (the derived ``arch_config`` left out): two
    builds of different configs differ by design, not by machine."""
    keys = [k for k in {**config, **other} if k != "arch_config"]
    return [f"{k} {config.get(k)!r} here, {other.get(k)!r} there" for k in keys if config.get(k) != other.get(k)]


def load_state(zoo_dir: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The full (merged) state dict of zoo model ``name``; adapter models are merged onto their parent's
    weights, recursively. O(parameters x adapter depth)."""
    return _load_state(Path(zoo_dir), name, ())


def _load_state(zoo_dir: Path, name: str, below: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """:func:`load_state` of ``name``, read for its adapter children ``below`` (a parent among them: a loop)."""
    from modelatlas.weights.lora_config import read_adapter_config
    from modelatlas.zoo.lora import apply_adapter

    folder = zoo_dir / name
    data = read_record(folder)
    if data is None:
        raise ManifestError(f"{folder}: not a finished zoo model (no {RECORD}); rebuild with `atlas zoo make`")
    rec = data["record"]
    if not valid_record(folder, rec):
        raise ManifestError(f"{folder / RECORD}: not a zoo model record (keys missing or of another type); "
                            "rebuild with `atlas zoo make`")
    if rec.get("storage") != "adapter":
        return read_tensors(folder / "model.safetensors", "rebuild the zoo model")
    cfg = read_adapter_config(folder / "adapter_config.json")  # a damaged one: an error naming the file and key
    if rec["parent"] is None or rec["parent"] in (name, *below):  # was a TypeError / RecursionError traceback
        why = "names no parent" if rec["parent"] is None else f"descends from itself ({' <- '.join([rec['parent'], name, *below])})"
        raise ManifestError(f"{folder / RECORD}: adapter model {name!r} {why}; rebuild with `atlas zoo make`")
    base = _load_state(zoo_dir, rec["parent"], (name, *below))
    path = folder / "adapter_model.safetensors"
    try:
        return apply_adapter(base, read_tensors(path, "rebuild the zoo model"), cfg.r, cfg.lora_alpha)
    except (KeyError, RuntimeError) as e:  # a tensor missing, or of another shape than the parent's weight
        raise CheckpointError(path, f"does not fit the weights of its parent {rec['parent']!r} ({' '.join(str(e).split())}); "
                                    "rebuild the zoo model") from None


def open_zoo_models(manifest) -> list:
    """Every model of a zoo as an open :class:`~modelatlas.weights.Checkpoint` of its full weights, in
    manifest order: an adapter-stored model is opened with its parent (itself merged, for an adapter of an
    adapter) as the base, from the manifest, so a zoo stored as adapters can be compared like a merged one.
    The caller closes them. Time O(N) opens, headers only."""
    from modelatlas.weights import open_checkpoint

    parents = manifest.parents()
    opened: dict = {}
    for name in sorted(manifest.names, key=lambda n: _depth(n, parents)):  # a parent before its children
        rec = manifest[name]
        base = None
        if rec.storage == "adapter":
            base = opened.get(rec.parent)
            if base is None:
                raise ManifestError(f"{manifest.path_of(name)}: adapter model {name!r} names no parent in the "
                                    "manifest to merge it onto; rebuild the zoo with `atlas zoo make`")
        opened[name] = open_checkpoint(manifest.path_of(name), base=base)
    return [opened[n] for n in manifest.names]


def _depth(name: str, parents: dict) -> int:
    """Edges from ``name`` up to its root. Time O(depth)."""
    d, seen = 0, {name}
    while parents.get(name) is not None and parents[name] not in seen:
        name = parents[name]
        seen.add(name)
        d += 1
    return d


def load_model(zoo_dir: str | Path, name: str) -> torch.nn.Module:
    """Zoo model ``name`` as an ``nn.Module`` in eval mode (architecture from the zoo manifest)."""
    from modelatlas.zoo.architectures import build_model
    from modelatlas.zoo.manifest import load_manifest

    arch = load_manifest(zoo_dir).config["arch_config"]
    model = build_model(arch)
    model.load_state_dict(load_state(zoo_dir, name))
    return model.eval()

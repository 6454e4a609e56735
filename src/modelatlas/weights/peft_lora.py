"""PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

PEFT stores, per adapted module, ``base_model.model.<module>.lora_A.weight`` of shape (r, in) and
``base_model.model.<module>.lora_B.weight`` of shape (out, r); the update to the module's weight is
``dW = s * B @ A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), where r and alpha come
from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module (Hu et al. 2021, "LoRA";
Kalajdzievski 2023, "rsLoRA").

With ``lora_bias: true`` in the config, lora_B also has a bias, saved as ``<module>.lora_B.bias``; PEFT merges
it as ``bias += s * lora_B.bias``, so the adapter's update to the module's bias is ``db = s * lora_B.bias``.

Opened alone, an adapter exposes every ``dW`` as ``<module>.weight`` (and every ``db`` as ``<module>.bias``) in
float32 (``kind = "lora_delta"``). Opened with ``base=`` (a path or an open Checkpoint), it exposes the merged
model: every base tensor, with each adapted one replaced by ``W + dW`` / ``b + db`` (``kind = "full"``). The
base is never looked up from ``base_model_name_or_path``: a lineage method must not read its answer from metadata.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import Checkpoint, TensorInfo, folder_name
from modelatlas.weights.hf_folder import open_weight_file
from modelatlas.weights.registry import open_checkpoint, register_format

CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# <module>.lora_A[.<adapter name>][.weight|.bias]; "bias" is a parameter, never an adapter name (it used to be
# taken for one, so a lora_B.bias silently replaced or was replaced by the lora_B weight).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])"
                  r"(?:\.(?!(?:weight|bias)$)[^.]+)?(?:\.(?P<param>weight|bias))?$")


@dataclass(frozen=True)
class LoraConfig:
    """The fields of ``adapter_config.json`` that define ``dW``."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None

    def scale(self, module: str) -> tuple[int, float]:
        """(r, s) for ``module``: per-module overrides first, then the global values."""
        key = _pattern_key(self.rank_pattern, module)
        r = int(self.rank_pattern[key]) if key else self.r
        key = _pattern_key(self.alpha_pattern, module)
        alpha = float(self.alpha_pattern[key]) if key else float(self.lora_alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def _pattern_key(patterns: dict, module: str) -> str | None:
    """The pattern PEFT would apply to ``module``: an exact name, else a regex matching a name suffix."""
    if module in patterns:
        return module
    for key in patterns:
        try:
            if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
                return key
        except re.error:
            continue
    return None


def read_adapter_config(path: Path) -> LoraConfig:
    """Parse and validate ``adapter_config.json``; errors name the file and the key."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"corrupt adapter config: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(path, "corrupt adapter config: not a JSON object")
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CheckpointError(path, f"unsupported peft_type {raw.get('peft_type')!r}: only LORA adapters are read")
    if raw.get("use_dora"):  # dW = m * (W + sBA) / ||W + sBA|| - W needs the base and the magnitudes
        raise CheckpointError(path, "key 'use_dora' is true: DoRA adapters are not supported (their update "
                                    "is not s * B @ A)")
    for key in ("r", "lora_alpha"):
        if not isinstance(raw.get(key), (int, float)) or isinstance(raw.get(key), bool) or raw[key] <= 0:
            raise CheckpointError(path, f"key {key!r} must be a positive number, got {raw.get(key)!r}")
    return LoraConfig(
        r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]), target_modules=raw.get("target_modules"),
        rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        use_rslora=bool(raw.get("use_rslora", False)), fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"))


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, *, embedding: bool = False,
               fan_in_fan_out: bool = False) -> torch.Tensor:
    """``dW = scale * B @ A`` in float32, shaped like the adapted weight.

    Linear: A (r, in), B (out, r) -> (out, in). Conv: A (r, in, *k), B (out, r, 1, ...) -> (out, in, *k).
    Embedding: A (r, num), B (dim, r) -> (num, dim). Time O(out * r * in), memory O(out * in).
    """
    a2 = a.float().reshape(a.shape[0], -1)  # (r, in * prod(k))
    b2 = b.float().reshape(b.shape[0], -1)  # (out, r)
    dw = scale * (b2 @ a2)  # (out, in * prod(k))
    if embedding or fan_in_fan_out:
        return dw.T.contiguous()  # (num, dim) / (in, out): the layer stores the transpose
    return dw.reshape(b.shape[0], *a.shape[1:])  # (out, in, *k)


def delta_shape(a: TensorInfo, b: TensorInfo, *, transpose: bool) -> tuple[int, ...]:
    shape = (b.shape[0], *a.shape[1:])
    return (shape[1], shape[0]) if transpose else shape


@dataclass(frozen=True)
class _Module:
    """One adapted module: its A/B tensor names in the adapter file and how to combine them."""

    a: str
    b: str
    embedding: bool
    bias: str | None = None  # lora_B's bias (``lora_bias: true``)


class LoraAdapterCheckpoint(Checkpoint):
    """A LoRA adapter exposing each module's update ``dW`` as ``<module>.weight`` (float32), and ``db`` as
    ``<module>.bias`` for modules whose lora_B has a bias."""

    format = "peft-lora"
    kind = "lora_delta"

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__(path, name if name is not None else folder_name(Path(path)))
        self.config = read_adapter_config(self.path / CONFIG)
        weight_file = next((self.path / f for f in WEIGHT_FILES if (self.path / f).is_file()), None)
        if weight_file is None:
            raise CheckpointError(self.path, f"adapter folder has no {' or '.join(WEIGHT_FILES)}")
        self.adapter = open_weight_file(weight_file)
        self.modules = self._pair_modules()

    def _pair_modules(self) -> dict[str, _Module]:
        """Group the adapter's tensors into modules, checking each has A and B of matching rank."""
        found: dict[str, dict[str, TensorInfo]] = {}
        emb: dict[str, bool] = {}
        for t in self.adapter.tensors():
            m = _KEY.match(t.name)
            if m:
                found.setdefault(m["module"], {})[m["ab"] + (".bias" if m["param"] == "bias" else "")] = t
                emb[m["module"]] = bool(m["emb"])
        if not found:
            raise CheckpointError(self.adapter.path, "no LoRA tensors (no '<module>.lora_A.weight' keys)")
        modules = {}
        for module, ab in found.items():
            self._check_pair(module, ab)
            bias = ab["B.bias"].name if "B.bias" in ab else None
            modules[f"{module}.weight"] = _Module(ab["A"].name, ab["B"].name, emb[module], bias)
        return modules

    def _check_pair(self, module: str, ab: dict[str, TensorInfo]) -> None:
        if "A.bias" in ab:  # PEFT's lora_bias only ever gives lora_B a bias: anything else is not s * B @ A + ...
            raise CheckpointError(self.adapter.path, f"module {module!r}: unexpected tensor {ab['A.bias'].name!r} "
                                                     "(only lora_B can have a bias)")
        if not {"A", "B"} <= set(ab):
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CheckpointError(self.adapter.path, f"module {module!r} has no {missing} tensor")
        a, b = ab["A"], ab["B"]
        r, _ = self.config.scale(module)
        if ab["A"].shape[0] != r or (b.shape[1] if len(b.shape) > 1 else -1) != r:
            raise CheckpointError(self.adapter.path, f"module {module!r}: rank {r} from {CONFIG} does not match "
                                                     f"lora_A {a.shape} / lora_B {b.shape}")
        bias = ab.get("B.bias")
        if bias is not None and bias.shape != (b.shape[0],):
            raise CheckpointError(self.adapter.path, f"module {module!r}: lora_B bias {bias.name!r} has shape "
                                                     f"{bias.shape}, expected ({b.shape[0]},)")

    def _transposed(self, mod: _Module) -> bool:
        return mod.embedding or self.config.fan_in_fan_out

    def _infos(self) -> list[TensorInfo]:
        infos = []
        for name, m in self.modules.items():
            a, b = self.adapter.info(m.a), self.adapter.info(m.b)
            infos.append(TensorInfo(name, delta_shape(a, b, transpose=self._transposed(m)), "float32"))
            if m.bias is not None:
                infos.append(TensorInfo(_bias_name(name), (b.shape[0],), "float32"))
        return infos

    def _read(self, name: str) -> torch.Tensor:
        if name.endswith(".bias"):  # only listed for modules with a lora_B bias
            mod = self.modules[name.removesuffix(".bias") + ".weight"]
            _, scale = self.config.scale(name.removesuffix(".bias"))
            return scale * self.adapter.read(mod.bias).float()
        mod = self.modules[name]
        _, scale = self.config.scale(name.removesuffix(".weight"))
        return lora_delta(self.adapter.read(mod.a), self.adapter.read(mod.b), scale,
                          embedding=mod.embedding, fan_in_fan_out=self.config.fan_in_fan_out)

    def extra_tensors(self) -> list[str]:
        """Adapter tensors that are not LoRA factors (``modules_to_save``: full replacement weights)."""
        return [k for k in self.adapter.keys() if not _KEY.match(k)]

    def close(self) -> None:
        self.adapter.close()


class MergedLoraCheckpoint(Checkpoint):
    """A base checkpoint with a LoRA adapter merged in: every base tensor, adapted ones as ``W + dW``."""

    format = "peft-lora-merged"
    kind = "full"

    def __init__(self, adapter: LoraAdapterCheckpoint, base: Checkpoint, owns_base: bool):
        super().__init__(adapter.path, adapter.name)
        self.adapter, self.base, self._owns_base = adapter, base, owns_base
        self.replaced = {_strip(k): k for k in adapter.extra_tensors() if _strip(k) in base}
        self._check_shapes()

    def _check_shapes(self) -> None:
        for info in self.adapter.tensors():
            name = info.name
            module, _, what = name.rpartition(".")  # what: "weight", or "bias" (which PEFT cannot merge without)
            if name not in self.base:
                raise CheckpointError(self.path, f"LoRA module {module!r} has no {what} {name!r} in the base "
                                                 f"{self.base.path}")
            if self.base.info(name).shape != info.shape:
                raise CheckpointError(self.path, f"LoRA module {module!r}: update shape {info.shape} does not "
                                                 f"match the base weight shape {self.base.info(name).shape}")

    def _infos(self) -> list[TensorInfo]:
        return self.base.tensors()

    def _read(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            return self.adapter.adapter.read(self.replaced[name])
        w = self.base.read(name)
        if name not in self.adapter:
            return w
        return (w.float() + self.adapter.read(name)).to(w.dtype)

    def close(self) -> None:
        self.adapter.close()
        if self._owns_base:
            self.base.close()


def _bias_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".bias"


def _strip(key: str) -> str:
    return key.removeprefix("base_model.model.")


def open_adapter(path: str | Path, base: str | Path | Checkpoint | None = None,
                 name: str | None = None) -> Checkpoint:
    """Open an adapter folder: the LoRA updates alone, or merged into ``base`` when given. ``base`` must hold
    full weights: a model, or an adapter already opened with its own base; an adapter alone is refused."""
    adapter = LoraAdapterCheckpoint(path, name)
    if base is None:
        return adapter
    owns = not isinstance(base, Checkpoint)
    try:
        base_ck = open_checkpoint(base) if owns else base
    except BaseException:
        adapter.close()
        raise
    try:
        if base_ck.kind != "full":  # an update merged onto an update is no model
            raise CheckpointError(adapter.path, f"base {base_ck.path} is itself a LoRA adapter (a weight update, "
                                                "not a model); give the model it adapts, or open it with its own "
                                                "base first: open_checkpoint(base, base=...)")
        return MergedLoraCheckpoint(adapter, base_ck, owns)
    except BaseException:
        adapter.close()
        if owns:
            base_ck.close()
        raise


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


register_format("peft-lora", is_adapter_folder, open_adapter)

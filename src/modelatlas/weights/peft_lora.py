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

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import Checkpoint, TensorInfo, error_line, folder_name
from modelatlas.weights.hf_folder import open_weight_file
from modelatlas.weights.lora_config import read_adapter_config
from modelatlas.weights.registry import distinct_models, open_checkpoint, register_format

CONFIG = "adapter_config.json"
_MAX_MODULE_NAME = 1024  # PEFT module names are ~100 characters
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# <module>.lora_A[.<adapter name>][.weight|.bias]; "bias" is a parameter, never an adapter name (it used to be
# taken for one, so a lora_B.bias silently replaced or was replaced by the lora_B weight).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])"
                  r"(?:\.(?!(?:weight|bias)$)[^.]+)?(?:\.(?P<param>weight|bias))?$")


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
        self._scales: dict[str, tuple[int, float]] = {}
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
            self._check_pair(module, ab, emb[module])
            bias = ab["B.bias"].name if "B.bias" in ab else None
            modules[f"{module}.weight"] = _Module(ab["A"].name, ab["B"].name, emb[module], bias)
        return modules

    def _check_pair(self, module: str, ab: dict[str, TensorInfo], embedding: bool) -> None:
        """A is (r, in, *k) and B (out, r, 1, ...) (2-D both for embeddings and fan_in_fan_out); r as configured."""
        if "A.bias" in ab:  # PEFT's lora_bias only ever gives lora_B a bias: anything else is not s * B @ A + ...
            raise CheckpointError(self.adapter.path, f"module {module!r}: unexpected tensor {ab['A.bias'].name!r} "
                                                     "(only lora_B can have a bias)")
        if not {"A", "B"} <= set(ab):
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CheckpointError(self.adapter.path, f"module {module!r} has no {missing} tensor")
        if len(module) > _MAX_MODULE_NAME:  # rank/alpha patterns are matched against it: O(len^2) per pattern
            raise CheckpointError(self.adapter.path, f"module name {module[:60]!r}... is {len(module)} characters "
                                                     f"long (at most {_MAX_MODULE_NAME})")
        a, b = ab["A"].shape, ab["B"].shape
        r, _ = self._scale(module)
        transposed = embedding or self.config.fan_in_fan_out  # lora_delta transposes a 2-D update
        if len(a) < 2 or len(b) < 2 or any(d != 1 for d in b[2:]) or (transposed and (len(a), len(b)) != (2, 2)):
            raise CheckpointError(self.adapter.path, f"module {module!r}: lora_A {a} / lora_B {b} are not LoRA "
                                                     "factors (expected (r, in, ...) and (out, r, 1, ...))")
        if 0 in a or 0 in b:  # no LoRA update has an empty side (a lying size in a damaged file)
            raise CheckpointError(self.adapter.path, f"module {module!r}: lora_A {a} / lora_B {b} have a dimension of "
                                                     "size 0")
        if a[0] != r or b[1] != r:
            raise CheckpointError(self.adapter.path, f"module {module!r}: rank {r} from {CONFIG} does not match "
                                                     f"lora_A {a} / lora_B {b}")
        bias = ab.get("B.bias")
        if bias is not None and bias.shape != (b[0],):
            raise CheckpointError(self.adapter.path, f"module {module!r}: lora_B bias {bias.name!r} has shape "
                                                     f"{bias.shape}, expected ({b[0]},)")

    def _scale(self, module: str) -> tuple[int, float]:
        """(r, s) of ``module``, matched against the config's patterns once per module."""
        if module not in self._scales:
            self._scales[module] = self.config.scale(module)
        return self._scales[module]

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
            _, scale = self._scale(name.removesuffix(".bias"))
            return scale * self.adapter.read(mod.bias).float()
        mod = self.modules[name]
        _, scale = self._scale(name.removesuffix(".weight"))
        a, b = self.adapter.read(mod.a), self.adapter.read(mod.b)
        try:
            return lora_delta(a, b, scale, embedding=mod.embedding, fan_in_fan_out=self.config.fan_in_fan_out)
        except RuntimeError as e:  # the (out, in) product does not fit in memory
            raise CheckpointError(self.path, f"cannot compute the update of {name!r} "
                                             f"({' x '.join(map(str, self.info(name).shape))} float32): "
                                             f"{error_line(e)}") from e

    def stored_tensors(self) -> list[TensorInfo]:
        """The factors (and lora_B biases, saved modules) as the adapter file stores them."""
        return self.adapter.tensors()

    def files(self) -> list[Path]:
        return [self.path / CONFIG, self.adapter.path]

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
        for name, key in self.replaced.items():  # modules_to_save: full weights read in place of the base's
            got, want = self.adapter.adapter.info(key).shape, self.base.info(name).shape
            if got != want:
                raise CheckpointError(self.path, f"saved module weight {name!r} has shape {got}, the base weight "
                                                 f"{want} (PEFT cannot load it onto this base either)")

    def _infos(self) -> list[TensorInfo]:
        return self.base.tensors()

    def stored_tensors(self) -> list[TensorInfo]:
        return self.adapter.stored_tensors()  # its own files: the base's are the base's

    def files(self) -> list[Path]:
        return self.adapter.files()

    def _read(self, name: str) -> torch.Tensor:
        if name in self.replaced:  # in the base's dtype, as listed: PEFT copies it into the base's module
            return self.adapter.adapter.read(self.replaced[name]).to(getattr(torch, self.base.info(name).dtype))
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


def open_adapter_base(path: str | Path) -> tuple[Path, Checkpoint]:
    """(its model path, the open model) of the base that PEFT adapters were trained on, to merge them onto
    (``open_checkpoint(adapter, base=...)``): one full model (a file, model folder or hub id), else a
    CheckpointError naming ``path``. The caller closes it."""
    from modelatlas.weights.registry import discover_models

    paths = discover_models([path])
    if len(paths) != 1:
        raise CheckpointError(Path(path), f"give one base model (a file, model folder or hub id), not a folder of "
                                          f"{len(paths)} models")
    base = open_checkpoint(paths[0])
    if base.kind != "full":
        base.close()
        raise CheckpointError(Path(path), f"a {base.kind.replace('_', ' ')} (an adapter), not a full model to merge "
                                          "adapters onto; give the model it was trained on")
    return paths[0], base


def open_with_base(item: str | Path, adapter_base: Checkpoint | None = None) -> Checkpoint:
    """``item`` opened; an adapter (kind ``lora_delta``) reopened merged onto ``adapter_base`` when given (the
    base of :func:`join_adapter_base`), so that it is read as the model it makes; any other model as itself."""
    ck = open_checkpoint(item)
    if adapter_base is None or ck.kind != "lora_delta":
        return ck
    ck.close()
    return open_checkpoint(item, base=adapter_base)


def join_adapter_base(base: str | Path | tuple | None, models: list[Path]) -> tuple[Checkpoint | None, list[Path]]:
    """(the open ``base`` that PEFT adapters among ``models`` were trained on, ``models`` with it first: the
    root its adapters hang from, kept once if also given); (None, ``models``) without one. ``base``: a path, or
    (its path, the open base) as :func:`open_adapter_base` gave them. A wrong base raises
    :func:`open_adapter_base`'s CheckpointError. The caller closes the base."""
    if base is None:
        return None, models
    path, ckpt = base if isinstance(base, tuple) else open_adapter_base(base)
    return ckpt, distinct_models([Path(path), *models])


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


register_format("peft-lora", is_adapter_folder, open_adapter)

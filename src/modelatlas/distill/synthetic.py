"""The learnable synthetic set S of dataset distillation.

:class:`SyntheticSet` holds
- ``images`` (N, C, H, W) (or (N, C, L)), a leaf tensor with ``requires_grad``;
- ``classes`` (N,) int64: the class layout (which class each image stands for; images are grouped by
  class, ``ipc`` per class); these are the hard labels;
- optional ``label_logits`` (N, K), learnable soft labels (targets = softmax(label_logits));
- optional ``lr`` (scalar), a learnable inner learning rate (MTT, RaT-BPTT);
- ``extras``: further named tensors a method needs to keep (e.g. a PoDD poster) and ``meta`` (JSON).

Save/load: ``synthetic.safetensors`` + ``synthetic.json`` in a folder, both written atomically.
Memory O(N * C * H * W + N * K).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from modelatlas.atomic import atomic_save_tensors, atomic_write_json, read_tensors
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.loop import read_json
from modelatlas.errors import CheckpointError, ConfigError

TENSORS_FILE, META_FILE = "synthetic.safetensors", "synthetic.json"


class SyntheticSet:
    """A learnable synthetic dataset (see the module docstring)."""

    def __init__(self, images: torch.Tensor, classes: torch.Tensor, num_classes: int,
                 label_logits: torch.Tensor | None = None, lr: torch.Tensor | float | None = None,
                 class_names: list[str] | None = None, extras: dict[str, torch.Tensor] | None = None,
                 meta: dict | None = None):
        if images.shape[0] != classes.shape[0]:
            raise ConfigError(f"synthetic set: {images.shape[0]} images but {classes.shape[0]} class entries")
        self.images = images.detach().clone().float().requires_grad_(True)
        self.classes = classes.detach().clone().long()
        self.num_classes = int(num_classes)
        self.label_logits = None if label_logits is None else label_logits.detach().clone().float().requires_grad_(True)
        self.lr = None if lr is None else torch.as_tensor(lr, dtype=torch.float32).detach().clone().requires_grad_(True)
        self.class_names = list(class_names or [str(i) for i in range(self.num_classes)])
        self.extras = {k: v.detach().clone() for k, v in (extras or {}).items()}
        self.meta = dict(meta or {})

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_real(cls, data: ArrayDataset, ipc: int, generator: torch.Generator, soft_labels: bool = False,
                  lr: float | None = None, label_scale: float = 10.0) -> SyntheticSet:
        """``ipc`` randomly chosen real images per class (the standard initialisation)."""
        check_class_sizes(data, ipc)
        idx = sample_per_class(data.y, data.num_classes, ipc, generator)  # (K * ipc,)
        classes = data.y[idx]
        logits = _one_hot_logits(classes, data.num_classes, label_scale) if soft_labels else None
        return cls(data.x[idx], classes, data.num_classes, logits, lr, data.classes, meta={"init": "real"})

    @classmethod
    def from_noise(cls, in_shape: tuple[int, ...], num_classes: int, ipc: int, generator: torch.Generator,
                   soft_labels: bool = False, lr: float | None = None, class_names: list[str] | None = None,
                   mean: float = 0.5, std: float = 0.25) -> SyntheticSet:
        """Gaussian-noise images (mean, std), ``ipc`` per class."""
        classes = torch.arange(num_classes).repeat_interleave(ipc)  # (K * ipc,)
        x = mean + std * torch.randn((len(classes), *in_shape), generator=generator)
        logits = _one_hot_logits(classes, num_classes, 10.0) if soft_labels else None
        return cls(x, classes, num_classes, logits, lr, class_names, meta={"init": "noise"})

    # ---- views --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def ipc(self) -> int:
        return len(self) // max(self.num_classes, 1)

    def targets(self) -> torch.Tensor:
        """Hard labels (N,) int64, or soft targets (N, K) = softmax(label_logits) when labels are learned."""
        if self.label_logits is None:
            return self.classes.to(self.images.device)
        return torch.softmax(self.label_logits, dim=1)

    def of_class(self, c: int) -> torch.Tensor:
        """The images of class ``c`` (a differentiable view)."""
        return self.images[self.classes.to(self.images.device) == c]

    def parameters(self) -> list[torch.Tensor]:
        """The learnable tensors: images, then label logits and lr when present."""
        return [t for t in (self.images, self.label_logits, self.lr) if t is not None]

    def to(self, device: str | torch.device) -> SyntheticSet:
        """Move every tensor to ``device`` (keeps them learnable leaves); returns self."""
        self.images = self.images.detach().to(device).requires_grad_(True)
        self.classes = self.classes.to(device)
        if self.label_logits is not None:
            self.label_logits = self.label_logits.detach().to(device).requires_grad_(True)
        if self.lr is not None:
            self.lr = self.lr.detach().to(device).requires_grad_(True)
        self.extras = {k: v.to(device) for k, v in self.extras.items()}
        return self

    def to_dataset(self, name: str = "synthetic") -> ArrayDataset:
        """A detached :class:`ArrayDataset` (hard labels) on the CPU."""
        return ArrayDataset(name, self.images.detach().cpu(), self.classes.cpu(), list(self.class_names))

    # ---- state (checkpoints) and files --------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"images": self.images.detach(), "classes": self.classes}
        if self.label_logits is not None:
            state["label_logits"] = self.label_logits.detach()
        if self.lr is not None:
            state["lr"] = self.lr.detach().reshape(1)
        state.update({f"extra.{k}": v for k, v in self.extras.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy values in place (optimisers holding these tensors stay valid)."""
        with torch.no_grad():
            self.images.copy_(state["images"])
            if self.label_logits is not None:
                self.label_logits.copy_(state["label_logits"])
            if self.lr is not None:
                self.lr.copy_(state["lr"].reshape(()))
        self.classes = state["classes"].to(self.classes.device)
        self.extras = {k[6:]: v.to(self.images.device, copy=True) for k, v in state.items() if k.startswith("extra.")}

    def save(self, folder: str | Path) -> Path:
        """Write ``synthetic.safetensors`` and ``synthetic.json`` into ``folder`` (atomically)."""
        folder = Path(folder)
        atomic_save_tensors(folder / TENSORS_FILE, self.state_dict())
        atomic_write_json(folder / META_FILE, {"num_classes": self.num_classes, "ipc": self.ipc,
                                               "class_names": self.class_names, "meta": self.meta})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> SyntheticSet:
        """Read a set written by :meth:`save`."""
        folder = Path(folder)
        for f in (TENSORS_FILE, META_FILE):
            if not (folder / f).is_file():
                raise CheckpointError(folder / f, "missing; not a saved synthetic set")
        state = read_tensors(folder / TENSORS_FILE)
        info = read_json(folder / META_FILE, "not a saved synthetic set")
        _check_saved(folder, state, info)
        lr = state["lr"].reshape(()) if "lr" in state else None
        extras = {k[6:]: v for k, v in state.items() if k.startswith("extra.")}
        return cls(state["images"], state["classes"], info["num_classes"], state.get("label_logits"), lr,
                   info.get("class_names"), extras, info.get("meta"))


def _check_saved(folder: Path, state: dict, info: dict) -> None:
    """The tensors and fields :meth:`SyntheticSet.load` needs, present and of the right kind."""
    for key in ("images", "classes"):
        if key not in state:
            raise CheckpointError(folder / TENSORS_FILE, f"has no tensor {key!r}; not a saved synthetic set")
    k = info.get("num_classes")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise CheckpointError(folder / META_FILE, f"num_classes must be a positive integer, got {k!r}")
    if not isinstance(info.get("meta", {}), dict) or not isinstance(info.get("class_names", []), (list, type(None))):
        raise CheckpointError(folder / META_FILE, "meta must be an object and class_names a list")
    names = info.get("class_names")
    if names is not None and (len(names) != k or not all(isinstance(n, str) for n in names)):
        odd = next((n for n in names if not isinstance(n, str)), None)
        got = f"{len(names)} entries" if len(names) != k else f"the non-string {odd!r}"
        raise CheckpointError(folder / META_FILE, f"class_names must be {k} strings, one per class (num_classes); "
                                                  f"got {got}")
    _check_tensors(folder / TENSORS_FILE, state, k)


_CLASS_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_tensors(path: Path, state: dict, k: int) -> None:
    """Tensors that fit together: a hand-edited file must fail here, naming itself, not deep in training."""
    images, classes = state["images"], state["classes"]
    if images.dim() < 2:
        raise CheckpointError(path, f"images must be (N, C, H, W) or (N, C, L), got shape {tuple(images.shape)}")
    n = images.shape[0]
    if classes.shape != (n,) or classes.dtype not in _CLASS_DTYPES:  # (uint64: min() failed, a traceback)
        raise CheckpointError(path, f"classes must be {n} integers (one per image), got shape "
                                    f"{tuple(classes.shape)} of {classes.dtype}")
    if n and not 0 <= int(classes.min()) <= int(classes.max()) < k:
        raise CheckpointError(path, f"classes must be class indices in [0, {k}) (num_classes {k}), got values "
                                    f"{int(classes.min())}..{int(classes.max())}")
    logits = state.get("label_logits")
    if logits is not None and tuple(logits.shape) != (n, k):
        raise CheckpointError(path, f"label_logits must be (N, K) = ({n}, {k}), got {tuple(logits.shape)}")
    if "lr" in state and state["lr"].numel() != 1:
        raise CheckpointError(path, f"lr must be one number, got shape {tuple(state['lr'].shape)}")
    for key, t in state.items():  # NaN images, labels or label projectors: chance, scored as a result
        if t.is_floating_point() and key != "lr" and not bool(torch.isfinite(t).all()):
            raise CheckpointError(path, f"{key} must be finite, but holds NaN or infinite values")
    lr = float(state["lr"].reshape(())) if "lr" in state else 1.0
    if not 0 < lr < math.inf:
        raise CheckpointError(path, f"lr must be a finite number > 0, got {lr:g}")


def check_class_sizes(data: ArrayDataset, ipc: int) -> None:
    """Refuse an ``ipc`` above the size of a class of ``data``, naming the class as the user knows it."""
    if data.num_classes == 0:
        return
    counts = torch.bincount(data.y, minlength=data.num_classes)
    c = int(counts.argmin())
    if int(counts[c]) < ipc:
        raise ConfigError(f"class {data.classes[c]!r} of {data.name!r} has {int(counts[c])} examples, fewer than "
                          f"ipc={ipc}; lower ipc")


def sample_per_class(y: torch.Tensor, num_classes: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``k`` random examples of every class, grouped by class. O(N) time."""
    out = []
    for c in range(num_classes):
        pool = torch.nonzero(y == c).flatten()
        if len(pool) < k:
            raise ConfigError(f"class {c} has {len(pool)} examples, fewer than ipc={k}; lower ipc")
        out.append(pool[torch.randperm(len(pool), generator=generator)[:k]])
    return torch.cat(out)


def _one_hot_logits(classes: torch.Tensor, num_classes: int, scale: float) -> torch.Tensor:
    return torch.nn.functional.one_hot(classes, num_classes).float() * float(scale)  # (N, K)

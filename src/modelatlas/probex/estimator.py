"""scikit-learn style experts on one layer's weights: ProbeX and the dense linear expert.

``ProbeXClassifier(config).fit(X, Y)`` with X of shape (B, d_H, d_W) (one layer per model, see
:func:`modelatlas.probex.load_layer`) and Y the (B, d_Y) multi-hot training-class sets. Saved as a folder
holding ``expert.json`` (config, shapes, names) and ``expert.safetensors`` (weights); loading never unpickles.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modelatlas.atomic import atomic_save_tensors, atomic_write_json, read_json_object, read_tensors
from modelatlas.digests import data_digest
from modelatlas.errors import CheckpointError, ConfigError
from modelatlas.probex.config import ProbeXConfig
from modelatlas.probex.fitted import check_fitted
from modelatlas.probex.model import build_network, check_train_memory, count_parameters
from modelatlas.probex.train import train_loop
from modelatlas.seeding import torch_generator, torch_seed

FORMAT = "modelatlas-probex/1"


class WeightExpert:
    """Shared plumbing: input normalisation, validation split, save/load. Subclasses define the task."""

    kind = "base"

    def __init__(self, config: ProbeXConfig | None = None, layer: str = ""):
        self.config = config if config is not None else ProbeXConfig()
        self.layer = layer

    # -- input normalisation -------------------------------------------------------------------------------
    def _fit_normaliser(self, x: torch.Tensor) -> None:
        # Centering removes the tree root that every model shares; one global scale keeps inputs O(1) so
        # the paper's learning rate works for layers of any initialisation scale.
        self.mean_ = x.mean(0) if self.config.center else torch.zeros_like(x[0])  # (d_H, d_W)
        spread = float((x - self.mean_).std()) if x[0].numel() * len(x) > 1 else 0.0
        # No spread (one training model, or identical ones): dividing by ~0 would blow every later input up
        # by 1e12, so leave the scale alone.
        self.scale_ = spread if math.isfinite(spread) and spread > 1e-12 else 1.0

    def _models(self, x, where: str) -> torch.Tensor:
        """X as float32 CPU matrices (B, d_H, d_W): the experts' networks live on the CPU, and conv kernels
        (B, out, in, k, k) become (B, out, in*k*k) as :func:`modelatlas.probex.as_matrix` reads them."""
        x = torch.as_tensor(x, dtype=torch.float32, device="cpu")
        if x.ndim < 3:
            raise ConfigError(f"{where}: X must be one weight matrix per model, shape (B, d_H, d_W); "
                              f"got shape {tuple(x.shape)} (wrap a single model as x[None])")
        bad = (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten().tolist()  # O(B d_H d_W)
        if bad:
            which = f"model {bad[0]} of X holds" if len(bad) == 1 else f"models {_listed(bad)} of X hold"
            raise ConfigError(f"{where}: {which} NaN or inf weights (a diverged or corrupt checkpoint); drop "
                              + ("it" if len(bad) == 1 else "them"))
        return x.flatten(2) if x.ndim > 3 else x

    def _normalise(self, x) -> torch.Tensor:
        check_fitted(self, "mean_")
        x = torch.as_tensor(x, dtype=torch.float32, device="cpu")
        if x.ndim == 2:
            x = x.unsqueeze(0)  # one model: (1, d_H, d_W)
        x = self._models(x, f"expert for layer {self.layer!r}")
        if tuple(x.shape[1:]) != tuple(self.mean_.shape):
            raise ConfigError(f"expert for layer {self.layer!r} expects matrices of shape "
                              f"{tuple(self.mean_.shape)}; got {tuple(x.shape[1:])}")
        return (x - self.mean_) / self.scale_

    def _split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n < 1:
            raise ConfigError("no models given: X must hold at least one model")
        perm = torch.randperm(n, generator=torch_generator(self.config.seed))
        # At least one model stays for training (val_fraction 0.95 on 10 models would round to all 10).
        n_val = min(int(round(n * self.config.val_fraction)), n - 1)
        return perm[n_val:], perm[:n_val] if n_val else perm[n_val:]

    def _build(self, d_h: int, d_w: int, d_y: int) -> nn.Module:
        self.shape_ = (d_h, d_w)
        # Seeded in a forked RNG: the same seed gives the same initial weights, and fitting or loading an
        # expert leaves the caller's global torch RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed(self.config.seed))
            return self._network(d_h, d_w, d_y)

    def _network(self, d_h: int, d_w: int, d_y: int) -> nn.Module:
        return build_network(self.config.model, d_h, d_w, d_y, self.config)

    @property
    def n_parameters_(self) -> int:
        check_fitted(self, "module_")
        return count_parameters(self.module_)

    def transform(self, x) -> np.ndarray:
        """The r_T representation e(X) of every model, shape (B, r_T)."""
        check_fitted(self, "module_")
        with torch.no_grad():
            return self._embed(self._normalise(x)).numpy()

    def _embed(self, xn: torch.Tensor) -> torch.Tensor:
        return self.module_.embed(xn)

    # -- persistence ---------------------------------------------------------------------------------------
    def _extra_meta(self) -> dict:
        return {}

    def _extra_tensors(self) -> dict:
        return {}

    def save(self, folder: str | Path) -> Path:
        """Write ``expert.json`` and ``expert.safetensors`` into ``folder`` atomically."""
        check_fitted(self, "module_")
        folder = Path(folder)
        tensors = {f"module.{k}": v for k, v in self.module_.state_dict().items()}
        tensors["mean"] = self.mean_
        tensors.update(self._extra_tensors())
        atomic_save_tensors(folder / "expert.safetensors", tensors)
        meta = {"format": FORMAT, "kind": self.kind, "config": self.config.to_dict(), "layer": self.layer,
                "shape": list(self.shape_), "scale": self.scale_, "history": getattr(self, "history_", {}),
                **self._extra_meta()}
        atomic_write_json(folder / "expert.json", meta)
        return folder

    def _restore(self, meta: dict, tensors: dict) -> None:
        raise NotImplementedError


class ProbeXClassifier(WeightExpert):
    """Predict a model's multi-hot training-class set from one layer (BCE with logits, sigmoid > 0.5).

    Time O(epochs * B * (d_H d_W r_U + d_H r_U r_V + r_U r_V r_T)); memory O(batch * d_H r_U + params).
    Fitted attributes: ``module_``, ``mean_``, ``scale_``, ``classes_``, ``history_``.
    """

    kind = "classifier"

    def fit(self, x, y, classes: list[str] | None = None, progress=None, checkpoint_dir=None,
            resume: bool = False) -> ProbeXClassifier:
        check_train_memory(self.config)  # before the layers are read and normalised
        x = self._models(x, "ProbeXClassifier.fit")
        y = _multi_hot(y, x.shape[0])
        if classes is not None and len(classes) != y.shape[1]:  # a saved expert rebuilds its head from them
            raise ConfigError(f"classes names {len(classes)} classes but labels have d_Y={y.shape[1]} columns")
        train, val = self._split(x.shape[0])
        self._fit_normaliser(x[train])
        xn = self._normalise(x)
        self.classes_ = list(classes) if classes is not None else [str(i) for i in range(y.shape[1])]
        self.module_ = self._build(x.shape[1], x.shape[2], y.shape[1])
        bce = nn.BCEWithLogitsLoss()

        def score() -> tuple[float, float]:  # (mean per-label accuracy, BCE) on the validation models
            logits = self.module_(xn[val])
            return float(((logits > 0).float() == y[val]).float().mean()), float(bce(logits, y[val]))

        self.history_ = train_loop(self.module_, lambda xb, yb: bce(self.module_(xb), yb), xn[train], y[train],
                                   score, self.config, progress, checkpoint_dir, resume,
                                   {"task": "classes", "layer": self.layer, "models": x.shape[0], "classes": self.classes_,
                                    **({"data": data_digest(x, y)} if checkpoint_dir is not None else {})})
        return self

    def predict_proba(self, x) -> np.ndarray:
        """Probability that each class was in the model's training set, shape (B, d_Y)."""
        check_fitted(self, "module_")
        with torch.no_grad():
            return torch.sigmoid(self.module_(self._normalise(x))).numpy()

    def predict(self, x) -> np.ndarray:
        """Multi-hot predictions (probability > 0.5), shape (B, d_Y), int."""
        return (self.predict_proba(x) > 0.5).astype(int)

    def _extra_meta(self) -> dict:
        return {"classes": self.classes_}

    def _restore(self, meta: dict, tensors: dict) -> None:
        self.classes_ = list(meta["classes"])
        self.module_ = self._build(*meta["shape"], len(self.classes_))
        self.module_.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("module.")})


class DenseExpert(ProbeXClassifier):
    """The dense linear expert baseline: ``ProbeXClassifier`` with ``config.model = "dense"``."""

    def __init__(self, config: ProbeXConfig | None = None, layer: str = ""):
        cfg = config if config is not None else ProbeXConfig()
        super().__init__(ProbeXConfig.from_dict({**cfg.to_dict(), "model": "dense"}), layer)


def _multi_hot(y, n: int) -> torch.Tensor:
    """Labels as a float (B, d_Y) tensor of 0s and 1s with B = ``n``: class indices or counts (2) and NaN trained
    silently against BCE targets outside [0, 1], and no column at all failed deep in the loss."""
    try:
        y = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    except (TypeError, ValueError) as e:  # class names (numpy.str_), ragged rows
        raise ConfigError(f"labels must be (B, d_Y) multi-hot: a table of numbers, 0 or 1 ({' '.join(str(e).split())[:80]})") from e
    if y.ndim != 2 or y.shape[0] != n:
        raise ConfigError(f"labels must be (B, d_Y) multi-hot with B={n}; got {tuple(y.shape)}")
    if y.shape[1] == 0:
        raise ConfigError(f"labels must be (B, d_Y) multi-hot with at least one class; got {tuple(y.shape)}")
    odd = y[(y != 0) & (y != 1)]  # NaN included
    if odd.numel():
        raise ConfigError(f"labels must be (B, d_Y) multi-hot, only 0 and 1; got {float(odd[0])!r} (pass class "
                          "sets as 0/1 columns, not class indices)")
    return y


def _listed(items: list, k: int = 5) -> str:
    """'3, 7, 9' or '3, 7, 9, 11, 12 and 4 more'."""
    shown = ", ".join(map(str, items[:k]))
    return shown + (f" and {len(items) - k} more" if len(items) > k else "")


def fit_probex(x, y, config: ProbeXConfig | None = None, **kwargs) -> ProbeXClassifier:
    """Plain-function twin of ``ProbeXClassifier(config).fit(x, y, **kwargs)``."""
    return ProbeXClassifier(config).fit(x, y, **kwargs)


def _saved_scale(meta: dict, meta_path: Path) -> float:
    """The saved input scale: every input is divided by it, so a 0, a negative or a NaN (a hand-edited file)
    would turn every prediction into NaN or nonsense without a word."""
    scale = float(meta["scale"])
    if not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(meta_path, f"scale must be a positive number (the spread of the training models' "
                                         f"weights); got {meta['scale']!r}; save the expert again")
    return scale


def _float_tensors(path: Path) -> dict:
    """The saved tensors as float32 (another tool may have written float64; a float64 mean made predict fail in
    a matmul of mixed dtypes), refusing NaN or inf: such weights loaded, and every prediction was NaN."""
    tensors = read_tensors(path, "not a complete ProbeX expert folder")
    for key, value in tensors.items():
        if value.is_floating_point():
            tensors[key] = value = value.float()
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(path, f"tensor {key!r} holds NaN or inf values (a diverged run or a damaged "
                                            "file); train the expert again")
    return tensors


def load_expert(folder: str | Path) -> WeightExpert:
    """Load an expert saved with ``save``; errors name the file. Never unpickles."""
    from modelatlas.probex.text_aligner import ProbeXTextAligner

    folder = Path(folder)
    meta_path = folder / "expert.json"
    meta = read_json_object(meta_path, "not a ProbeX expert folder (missing expert.json)", "an expert's settings")
    if meta.get("format") != FORMAT:
        raise CheckpointError(meta_path, f"unknown expert format {meta.get('format')!r} (expected {FORMAT})")
    cls = {"classifier": ProbeXClassifier, "text": ProbeXTextAligner}.get(meta.get("kind"))
    if cls is None:
        raise CheckpointError(meta_path, f"unknown expert kind {meta.get('kind')!r}")
    if cls is ProbeXClassifier and isinstance(meta.get("config"), dict) and meta["config"].get("model") == "dense":
        cls = DenseExpert  # saved with the classifier's kind: the dense model in its config tells them apart
    tensors = _float_tensors(folder / "expert.safetensors")
    try:
        config = ProbeXConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(meta_path, f"bad config: {' '.join(str(e).split())}") from e
    expert = cls(config, meta.get("layer", ""))
    try:
        expert.mean_, expert.scale_ = tensors["mean"], _saved_scale(meta, meta_path)
        expert.history_ = meta.get("history", {})
        expert._restore(meta, tensors)
        if tuple(expert.mean_.shape) != tuple(expert.shape_):  # predict would blame the right-shaped models
            raise ValueError(f"mean has shape {tuple(expert.mean_.shape)}, the expert {tuple(expert.shape_)}")
    except (KeyError, RuntimeError, TypeError, ValueError) as e:  # a missing key or weights of another shape
        detail = " ".join(str(e).split())[:300]  # load_state_dict's report spans many lines
        raise CheckpointError(folder, f"expert.json and expert.safetensors do not match ({type(e).__name__}: "
                                      f"{detail}); save the expert again") from e
    expert.module_.eval()
    return expert

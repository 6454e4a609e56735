"""StatNN baseline (Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights"):
per-layer weight statistics of every layer + a standard classifier (gradient boosting, one per label).

Saved without pickle: scikit-learn models have no safetensors form, so :meth:`StatNNClassifier.save` writes
skops' format (extra ``statnn``), whose loader builds only allow-listed types and refuses a file that names
any other (:data:`TRUSTED`), plus a JSON config.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from modelatlas.atomic import atomic_write, atomic_write_json, read_json_object
from modelatlas.errors import CheckpointError, ConfigError
from modelatlas.probex.fitted import check_fitted

FORMAT = "modelatlas-statnn/1"
# the one type a fitted model holds beyond skops' default-trusted scikit-learn/numpy types
TRUSTED = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)
STATS = ("mean", "var", "q0", "q25", "q50", "q75", "q100", "skew", "kurtosis")


def layer_statistics(layers: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Features (B, 9 * n_layers): mean, variance, 0/25/50/75/100% quantiles, skewness and kurtosis of every
    layer ``name -> (B, ...)``, in the mapping's order. Time O(B * P log P) for P weights per layer; extra
    memory O(max(P, _BLOCK)): models are reduced in blocks of about _BLOCK weights (each model's statistics
    are its own, so blocking changes no value; all 800 models of a 512-wide zoo at once took the benchmark
    to 24 GB)."""
    feats = []
    for name, t in layers.items():
        flat = torch.as_tensor(t).reshape(t.shape[0], -1)  # (B, P), stored dtype: converted per block
        if flat.shape[1] < 1:
            raise ConfigError(f"layer {name!r} is empty")
        rows = max(1, _BLOCK // flat.shape[1])
        feats.append(torch.cat([_row_statistics(flat[r:r + rows]) for r in range(0, len(flat), rows)]))  # (B, 9)
    return torch.cat(feats, 1).cpu().numpy()


_BLOCK = 1 << 23  # weights per block of models in :func:`layer_statistics` (64 MiB in float64)
_QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _row_statistics(block: torch.Tensor) -> torch.Tensor:
    """(R, 9) statistics of each row of ``block`` (R, P), computed in float64."""
    flat = block.to(torch.float64)  # (R, P)
    mean = flat.mean(1, keepdim=True)
    centred = flat - mean
    var = centred.pow(2).mean(1, keepdim=True)
    std = var.sqrt().clamp_min(1e-12)
    q = torch.quantile(flat, torch.tensor(_QUANTILES, dtype=torch.float64, device=flat.device), dim=1).T  # (R, 5)
    z = centred.div_(std)  # in place: one (R, P) temporary fewer
    skew = z.pow(3).mean(1, keepdim=True)
    kurt = z.pow(4).mean(1, keepdim=True)
    return torch.cat([mean, var, q, skew, kurt], 1)  # (R, 9)


class StatNNClassifier:
    """Multi-label StatNN: ``fit(layers, Y)`` with ``layers`` a mapping name -> (B, ...) of every layer.

    Time O(n_labels * boosting cost on (B, 9 L) features). Fitted attributes: ``model_``, ``n_features_``.
    """

    def __init__(self, max_iter: int = 100, seed: int = 0):
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, layers: Mapping[str, torch.Tensor], y) -> StatNNClassifier:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.multioutput import MultiOutputClassifier

        feats = layer_statistics(layers)
        base = HistGradientBoostingClassifier(max_iter=self.max_iter, random_state=self.seed)
        self.model_ = MultiOutputClassifier(base).fit(feats, np.asarray(y))
        self.n_features_ = feats.shape[1]
        self.layers_ = [str(name) for name in layers]  # their order is the features' order
        return self

    def predict_proba(self, layers: Mapping[str, torch.Tensor]) -> np.ndarray:
        """(B, d_Y) probability of each label."""
        check_fitted(self, "model_")
        probs = self.model_.predict_proba(self._features(layers))
        return np.stack([_positive(est, p) for est, p in zip(self.model_.estimators_, probs)], 1)

    def predict(self, layers: Mapping[str, torch.Tensor]) -> np.ndarray:
        check_fitted(self, "model_")
        return np.asarray(self.model_.predict(self._features(layers))).astype(int)

    def _features(self, layers: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The statistics of ``layers``, which must be the fitted ones in the fitted order: other layers of as
        many features were scored silently, and another count was scikit-learn's feature-count ValueError."""
        fitted = getattr(self, "layers_", None)  # None: loaded from a file saved before names were recorded
        if fitted is not None and [str(name) for name in layers] != fitted:
            raise ConfigError(f"StatNN was fitted on layers {fitted}; got {[str(name) for name in layers]} (pass the "
                              "same layers, in the same order)")
        return layer_statistics(layers)

    def save(self, folder: str | Path) -> Path:
        """Write ``statnn.json`` and ``statnn.skops`` into ``folder`` atomically (needs the ``statnn`` extra)."""
        check_fitted(self, "model_")
        sio = _skops()
        folder = Path(folder)
        atomic_write(folder / "statnn.skops", lambda tmp: sio.dump(self.model_, str(tmp)))
        atomic_write_json(folder / "statnn.json", {"format": FORMAT, "max_iter": self.max_iter, "seed": self.seed,
                                                   "n_features": self.n_features_,
                                                   **({"layers": self.layers_} if hasattr(self, "layers_") else {})})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> StatNNClassifier:
        """Load a folder written by :meth:`save`. Never unpickles: a model file naming any type outside skops'
        defaults and :data:`TRUSTED` is refused with an error naming the file and the types."""
        sio = _skops()
        folder = Path(folder)
        meta, model_path = _read_meta(folder), folder / "statnn.skops"
        try:
            untrusted = sio.get_untrusted_types(file=str(model_path))
        except FileNotFoundError as e:
            raise CheckpointError(folder, f"not a StatNN folder (missing {Path(e.filename).name})") from e
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # a zip archive; cut short: BadZipFile
            raise CheckpointError(model_path, f"cannot read StatNN model: {e}") from e
        refused = sorted(set(untrusted) - set(TRUSTED))
        if refused:
            raise CheckpointError(model_path, f"refused: the file would build types outside the allow-list: {refused}")
        out = cls(max_iter=meta["max_iter"], seed=meta["seed"])
        out.model_ = sio.load(str(model_path), trusted=list(untrusted))
        out.n_features_ = meta["n_features"]
        if isinstance(meta.get("layers"), list):
            out.layers_ = [str(name) for name in meta["layers"]]
        return out


def _read_meta(folder: Path) -> dict:
    """``statnn.json``, its format and integer keys checked; errors name it (a truncated one was blamed on
    statnn.skops, and a missing key or a seed of 'x' were KeyError and ValueError tracebacks)."""
    meta_path = folder / "statnn.json"
    meta = read_json_object(meta_path, "not a StatNN folder (missing statnn.json)", "StatNN's settings")
    if meta.get("format") != FORMAT:
        raise CheckpointError(meta_path, f"format {meta.get('format')!r} is not {FORMAT!r}")
    for key in ("max_iter", "seed", "n_features"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            got = "missing" if key not in meta else f"got {value!r:.60}"
            raise CheckpointError(meta_path, f"{key} must be an integer; {got}; save the model again")
    return meta


def _positive(estimator, proba: np.ndarray) -> np.ndarray:
    """P(label present) from one label's classifier: its last column, or, for a label that was constant in
    training, 1 when that class was "present" and 0 when it was "absent" (gradient boosting then still
    returns two columns, the second ~0, whatever the class was)."""
    if len(estimator.classes_) > 1:
        return proba[:, -1]
    return np.full(len(proba), float(bool(estimator.classes_[0])))


def _skops():
    try:
        import skops.io as sio
    except ImportError as e:
        raise ConfigError("saving or loading StatNN needs skops: pip install 'modelatlas[statnn]'") from e
    return sio

"""Fitted data transforms saved beside a result: per-channel standardisation and ZCA whitening.

Each transform follows the scikit-learn habit (``fit`` returns self, fitted attributes end in ``_``) and
adds ``inverse`` (to show images) and ``state_dict``/``from_state_dict`` (tensors, saved as safetensors) so
that a released synthetic set is used with exactly the transform it was distilled under, and the test set
gets the same one.
"""

from __future__ import annotations

import math

import torch

from modelatlas.config_types import fits
from modelatlas.errors import ConfigError


class _Loadable:
    kind = "identity"

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]):
        """Rebuild a fitted transform of this class from its :meth:`state_dict`."""
        return from_state_dict(cls.kind, state)


def _check_finite(kind: str, x: torch.Tensor) -> None:
    """Refuse NaN / infinite inputs to ``fit``: one made every transformed value NaN, silently."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1))  # (N, D)
    if bool(bad.any()):
        i = int(bad.any(dim=1).nonzero()[0])
        first = float(x[i].reshape(-1)[bad[i]][0])
        raise ConfigError(f"{kind} transform: cannot fit on non-finite inputs (first {first} in example {i}); "
                          "remove or repair those examples")


class Identity(_Loadable):
    """No transform (the default)."""

    kind = "identity"

    def fit(self, x: torch.Tensor, finite: bool = False) -> Identity:
        return self

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


class Standardize(_Loadable):
    """Per-channel (x - mean) / std; a channel with std below ``eps`` (constant) is only centred.
    Fit is O(N * D) time, O(C) memory."""

    kind = "standardize"

    def __init__(self, eps: float = 1e-8):
        self.eps = eps

    def fit(self, x: torch.Tensor, finite: bool = False) -> Standardize:
        """``finite``: the caller has checked ``x`` for NaN / inf (the O(N D) scan is not made twice)."""
        if not finite:
            _check_finite(self.kind, x)
        dims = [0] + list(range(2, x.dim()))  # every axis but the channel
        self.mean_ = x.float().mean(dim=dims)  # (C,)
        std = x.float().std(dim=dims) if x[:, :1].numel() > 1 else torch.zeros(x.shape[1])  # (C,)
        # a constant channel (or a single value) is left unscaled, as scikit-learn does: std clamped to eps
        # turned a test value 0.1 from the constant into 1e7
        self.std_ = torch.where(std < self.eps, torch.ones_like(std), std)
        return self

    def _shape(self, x: torch.Tensor) -> list[int]:
        return [1, -1] + [1] * (x.dim() - 2)  # broadcast (C,) over (N, C, ...)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        s = self._shape(x)
        return (x - self.mean_.to(x).view(s)) / self.std_.to(x).view(s)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        s = self._shape(x)
        return x * self.std_.to(x).view(s) + self.mean_.to(x).view(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_, "std": self.std_}


class ZCA(_Loadable):
    """ZCA whitening W = U diag(1/sqrt(lambda + reg)) U^T on flattened inputs, reg = ``regularization`` x
    mean eigenvalue (0.1 as in the KIP/MTT code; ``regularization`` itself for constant data). Fit is
    O(N D^2 + D^3) time, O(D^2) memory (D = C*H*W)."""

    kind = "zca"

    def __init__(self, regularization: float = 0.1):
        # nan passed `<= 0` and whitened everything to NaN
        if not fits(regularization, float) or not 0 < regularization < math.inf:
            raise ConfigError(f"ZCA regularization must be > 0 and finite, got {regularization!r}")
        self.regularization = regularization

    def fit(self, x: torch.Tensor, finite: bool = False) -> ZCA:
        """``finite``: as :meth:`Standardize.fit`."""
        if not finite:
            _check_finite(self.kind, x)
        flat = x.reshape(x.shape[0], -1).double()  # (N, D)
        self.mean_ = flat.mean(0)  # (D,)
        cov = (flat - self.mean_).T @ (flat - self.mean_) / max(flat.shape[0] - 1, 1)  # (D, D)
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0)
        # constant data has no variance: regularise by the absolute amount instead of 0 (rsqrt(0) = inf, NaN out)
        reg = self.regularization * (evals.mean() if float(evals.mean()) > 0 else 1.0)
        self.whiten_ = (evecs * (evals + reg).rsqrt()) @ evecs.T  # (D, D)
        self.unwhiten_ = (evecs * (evals + reg).sqrt()) @ evecs.T  # (D, D)
        self.mean_, self.whiten_, self.unwhiten_ = self.mean_.float(), self.whiten_.float(), self.unwhiten_.float()
        return self

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)  # (N, D)
        return ((flat - self.mean_.to(x)) @ self.whiten_.to(x)).reshape(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)  # (N, D)
        return (flat @ self.unwhiten_.to(x) + self.mean_.to(x)).reshape(x.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_, "whiten": self.whiten_, "unwhiten": self.unwhiten_,
                "regularization": torch.tensor(self.regularization)}


_KINDS = {"identity": Identity, "standardize": Standardize, "zca": ZCA}
KINDS = tuple(_KINDS)


def make_transform(kind: str | None):
    """A fresh unfitted transform by name: None/"identity", "standardize" or "zca"."""
    kind = kind or "identity"
    if kind not in _KINDS:
        raise ConfigError(f"transform must be one of {', '.join(_KINDS)}, got {kind!r}")
    return _KINDS[kind]()


_STATE_KEYS = {"identity": (), "standardize": ("mean", "std"), "zca": ("mean", "whiten", "unwhiten", "regularization")}


def from_state_dict(kind: str, state: dict[str, torch.Tensor]):
    """Rebuild a fitted transform from :meth:`state_dict` output and its ``kind``; a missing tensor, a NaN /
    infinite value, a std <= 0, or tensors whose shapes disagree raise :class:`ConfigError` naming them."""
    t = make_transform(kind)
    missing = [k for k in _STATE_KEYS[kind] if k not in state]
    if missing:
        raise ConfigError(f"the saved {kind!r} transform has no tensor {missing[0]!r}")
    _check_state_shapes(kind, state)
    _check_state_values(kind, state)
    if kind == "standardize":
        t.mean_, t.std_ = state["mean"], state["std"]
    elif kind == "zca":
        t.regularization = float(state["regularization"])
        t.mean_, t.whiten_, t.unwhiten_ = state["mean"], state["whiten"], state["unwhiten"]
    return t


def _check_state_shapes(kind: str, state: dict[str, torch.Tensor]) -> None:
    if kind == "standardize":
        ok = state["mean"].dim() == 1 and state["std"].shape == state["mean"].shape
    elif kind == "zca":
        d = state["mean"].numel()
        ok = (state["mean"].dim() == 1 and state["whiten"].shape == (d, d) and state["unwhiten"].shape == (d, d)
              and state["regularization"].numel() == 1)
    else:
        return
    if not ok:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
        raise ConfigError(f"the saved {kind!r} transform has tensors of inconsistent shapes ({shapes})")


def _check_state_values(kind: str, state: dict[str, torch.Tensor]) -> None:
    """A NaN / infinite tensor (a transform fitted on NaN data) or a std <= 0 made every input NaN or inf."""
    for key in _STATE_KEYS[kind]:
        if not bool(torch.isfinite(state[key].float()).all()):
            raise ConfigError(f"the saved {kind!r} transform has a non-finite value in {key!r}")
    if kind == "standardize" and bool((state["std"] <= 0).any()):
        raise ConfigError(f"the saved {kind!r} transform has a non-positive value in 'std'")

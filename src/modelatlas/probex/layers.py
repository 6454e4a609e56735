"""One layer per model, as a matrix: the only place ProbeX reads checkpoints (through modelatlas.weights).

A linear weight (out, in) stays as is (d_H = out, d_W = in); a conv kernel (out, in, k, k) becomes
(out, in*k*k); a LoRA adapter's update is read as dW = B A through the adapter reader (merged, W + dW, when
:func:`load_layer` is given the base). Every model is opened
once and only the requested tensor is read, never the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from modelatlas.errors import CheckpointError, ConfigError
from modelatlas.progress import Progress, resolve
from modelatlas.weights import Checkpoint, open_checkpoint, open_with_base


def as_matrix(tensor: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """A weight tensor as a float32 matrix (d_H, d_W). 1-D tensors (biases, norms) and empty ones are refused."""
    if tensor.ndim >= 2 and tensor.numel() == 0:  # (0, 4) failed in reshape; (4, 0) gave nothing to train on
        raise ConfigError(f"layer {name!r} has shape {tuple(tensor.shape)} and no values; ProbeX needs a matrix "
                          "or conv kernel that holds some")
    if tensor.ndim < 2:
        raise ConfigError(f"layer {name!r} has shape {tuple(tensor.shape)}; ProbeX needs a matrix or conv "
                          "kernel (pick a weight, not a bias or norm)")
    return tensor.float().reshape(tensor.shape[0], -1)  # (out, in) or (out, in*k*k)


def load_layer(paths: Sequence[str | Path], layer: str, progress: Progress | None = None,
               adapter_base: Checkpoint | None = None) -> torch.Tensor:
    """Read tensor ``layer`` of every model into X of shape (B, d_H, d_W); each model is opened once. With
    ``adapter_base``, an adapter is read merged onto it (W + B A): experts learn full models' layers, and an
    update alone is none.

    Raises CheckpointError naming the model whose layer is missing or has a different shape.
    Time O(B d_H d_W) reads; memory O(B d_H d_W).
    """
    mats: list[torch.Tensor] = []
    for path in resolve(progress)(list(paths), total=len(paths), desc=f"read {layer}"):
        with open_with_base(path, adapter_base) as ckpt:
            mat = as_matrix(ckpt.read(layer), layer)
        _check_same_shape(path, layer, mat, mats)
        mats.append(mat)
    if not mats:
        raise ConfigError("no models given")
    return torch.stack(mats)  # (B, d_H, d_W)


def check_finite(paths: Sequence[str | Path], x: torch.Tensor, layer: str) -> None:
    """Raise CheckpointError naming the first model whose ``layer`` (row of X, (B, d_H, d_W)) holds NaN or inf:
    an expert or router fitted on it would learn NaN. Time O(B d_H d_W)."""
    bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero().flatten().tolist()
    if bad:
        raise CheckpointError(list(paths)[bad[0]], f"tensor {layer!r} holds NaN or inf values (a diverged or "
                                                   f"corrupt checkpoint){_more(len(bad) - 1)}; fix or remove it")


def _more(n: int) -> str:
    return "" if n == 0 else f", as do {n} other model" + ("s" if n > 1 else "")


def _check_same_shape(path, layer: str, tensor: torch.Tensor, previous: list[torch.Tensor]) -> None:
    if previous and tensor.shape != previous[0].shape:
        raise CheckpointError(path, f"layer {layer!r} has shape {tuple(tensor.shape)}, other models have "
                                    f"{tuple(previous[0].shape)} (ProbeX needs one architecture per expert)")


def candidate_layers(path: str | Path, min_size: int = 2) -> list[str]:
    """Names of the weight matrices/kernels of one model (read from its header only), in file order."""
    with open_checkpoint(path) as ckpt:
        return [t.name for t in ckpt.tensors() if len(t.shape) >= 2 and min(t.shape[:2]) >= min_size]


def load_layers(paths: Sequence[str | Path], layers: Sequence[str], progress: Progress | None = None,
                matrices: bool = True) -> dict[str, torch.Tensor]:
    """Several layers at once, each model opened once: name -> (B, d_H, d_W) (``matrices=False``: the
    tensors as stored, in float32, e.g. biases for StatNN)."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for path in resolve(progress)(list(paths), total=len(paths), desc="read layers"):
        with open_checkpoint(path) as ckpt:
            for name in layers:
                t = ckpt.read(name)
                t = as_matrix(t, name) if matrices else t.float()
                _check_same_shape(path, name, t, out[name])  # torch.stack's error would not name the model
                out[name].append(t)
    if layers and not out[layers[0]]:
        raise ConfigError("no models given")
    return {name: torch.stack(mats) for name, mats in out.items()}  # each (B, d_H, d_W)

"""The units of DDM's offline phase that an interrupted run keeps and a resume continues from.

A unit is kept as named tensors in a :class:`UnitStore` (:class:`~.checkpoint.RunCheckpoint` writes them to
``OUT/checkpoint``): ``clusters`` (step 1: the assignment), ``target`` (step 2: the final weights and the
checkpoints) and ``match`` (step 3, saved as it goes: the synthetic images and logits, Adam's state and the loss
of every step done). Each depends only on the data, the config and the seed, and tensors read back bit for bit,
so a run continued from them gives the tensors of an uninterrupted one. The Hessian factor (O(P^2)) is not kept:
it and the online step are recomputed, in seconds where the matching takes minutes.
"""

from __future__ import annotations

from typing import Protocol

import torch

Shapes = dict[str, "tuple[int, ...] | None"]  # tensor name -> its shape (None: any)
ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


class UnitStore(Protocol):
    def load(self, unit: str, shapes: Shapes) -> dict[str, torch.Tensor] | None:
        """The kept tensors of ``unit`` (each of ``shapes`` present, of that shape), or None when none are kept."""

    def save(self, unit: str, tensors: dict[str, torch.Tensor], progress: tuple[int, int] | None = None) -> None:
        """Keep ``tensors`` as ``unit`` (``progress``: (done, total) of a unit saved as it goes)."""

    def due(self) -> bool:
        """Whether a unit saved as it goes should be saved now (its saving interval has passed)."""


class _Nowhere:
    """A store that keeps nothing: a run that is not resumable."""

    def load(self, unit: str, shapes: Shapes) -> None:
        return None

    def save(self, unit: str, tensors: dict, progress: tuple[int, int] | None = None) -> None:
        pass

    def due(self) -> bool:
        return False


NOWHERE = _Nowhere()


def seconds(value: float) -> torch.Tensor:
    """A unit's wall seconds as a float64 scalar (read back exactly)."""
    return torch.tensor(value, dtype=torch.float64)


def pack_params(prefix: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in params.items()}


def param_shapes(prefix: str, params: dict[str, torch.Tensor]) -> Shapes:
    return {f"{prefix}/{k}": tuple(v.shape) for k, v in params.items()}


def unpack_params(prefix: str, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The parameters saved by :func:`pack_params`, in the order of ``names`` (flattening follows it)."""
    return {k: tensors[f"{prefix}/{k}"] for k in names}


def adam_tensors(opt: torch.optim.Adam) -> dict[str, torch.Tensor]:
    """Adam's state (step and both moments of every parameter) as named tensors."""
    return {f"adam/{i}/{k}": v for i, state in opt.state_dict()["state"].items() for k, v in state.items()}


def adam_shapes(params: list[torch.Tensor]) -> Shapes:
    return {f"adam/{i}/{k}": () if k == "step" else tuple(p.shape) for i, p in enumerate(params) for k in ADAM_KEYS}


def restore_adam(opt: torch.optim.Adam, tensors: dict[str, torch.Tensor]) -> None:
    """Put the state saved by :func:`adam_tensors` back into ``opt`` (same parameters, in the same order)."""
    sd = opt.state_dict()
    count = len(sd["param_groups"][0]["params"])
    sd["state"] = {i: {k: tensors[f"adam/{i}/{k}"].clone() for k in ADAM_KEYS} for i in range(count)}
    opt.load_state_dict(sd)

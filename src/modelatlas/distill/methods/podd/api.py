"""``run_poster``: distil a dataset into a PoDD poster of a fractional IPC, evaluate, write the result folder.

A thin layer over :func:`modelatlas.distill.run_distillation` (method ``podd`` with ``poster_ipc``): the
random-real-subset baseline is scored at ceil(ipc) images per class (the smallest real subset with at least
as many pixels), under the same Adam protocol. Time: see :mod:`.method`.
"""

from __future__ import annotations

import math
from pathlib import Path

from modelatlas.errors import ConfigError
from modelatlas.progress import Progress


def run_poster(dataset, ipc: float, out: str | Path, config: dict | None = None, seed: int = 0,
               eval_nets: int = 5, eval_epochs: int | None = None, transform: str | None = None,
               dataset_kwargs: dict | None = None, baseline: bool = True, progress: Progress | None = None,
               resume: bool = False, device: str | None = None, dataset_test=None) -> dict:
    """Returns the ``result.json`` dict (``ipc`` is the poster's actual IPC, ``poster_ipc_target`` the asked one);
    a ``resume`` of a finished poster with nothing to redo returns the stored one with ``"reused": True``,
    writing nothing (:mod:`modelatlas.distill.finished`)."""
    from modelatlas.distill.api import run_distillation

    if not (ipc > 0 and math.isfinite(ipc)):
        raise ConfigError(f"--ipc must be a finite number > 0 for a poster, got {ipc}")
    given = (config or {}).get("poster_ipc")
    if given is not None and given != ipc:  # the config's value was silently replaced by ipc
        shown = f"{given:g}" if isinstance(given, (int, float)) else repr(given)
        raise ConfigError(f"--set poster_ipc={shown} differs from --ipc {ipc:g}; give the poster's ipc once "
                          "(--ipc, the ipc argument)")
    cfg = {**(config or {}), "poster_ipc": float(ipc)}
    # a dataset named (not loaded here) keeps its test split known by name: a finished run can then be reused
    info = run_distillation("podd", dataset, max(1, math.ceil(ipc)), out, config=cfg, seed=seed,
                            eval_nets=eval_nets, eval_epochs=eval_epochs, transform=transform,
                            dataset_test=dataset_test, dataset_kwargs=dataset_kwargs, baseline=baseline,
                            progress=progress, resume=resume, device=device, ipc_asked=f"--ipc {ipc:g} (a poster)")
    if info.get("reused"):
        return info
    from modelatlas.distill.result import read_info

    return read_info(out)  # as written: with the poster's fields (poster_fields), the losses and the transform


def poster_fields(syn, run_ipc: int) -> dict:
    """The fields result.json has for a PoDD set (none for another set), whichever command made it (`atlas
    distill poster` or `distill run --method podd`): ``ipc`` the poster's actual IPC, ``poster_ipc_target`` the
    asked one, ``poster`` its layout, ``baseline_ipc`` the run's images per class (its random baseline's)."""
    if "poster" not in syn.meta:
        return {}
    return {"ipc": round(syn.meta["poster_ipc"], 4), "poster_ipc_target": float(syn.meta["poster_ipc_target"]),
            "poster": syn.meta["poster"], "baseline_ipc": run_ipc}

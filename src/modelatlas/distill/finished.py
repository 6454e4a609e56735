"""A resume with nothing left to do: the finished run's stored result, instead of rebuilding the method,
scoring the same set again under the same protocol and redrawing the figures (~1-2 s for a tiny run, the
evaluation's time for a real one).

The stored result is returned only when everything that would be recomputed is known to come out the same:
the checkpoint is finished (its iterations are the asked ones, its seed this seed) and ``result.json``
records the same loss history, config, seed, starting set, data settings, torch version, baseline and
evaluation protocol (resolved: nets, epochs, lr, net, device), and the folder's files all load (a poster's
result.json with its poster's fields). Anything else (another ``--eval-nets``, a missing figure, a damaged
file) goes the full way, which rewrites the folder; so does a run on a given ``dataset_test`` (an
ArrayDataset, not recorded: it may be another test set).
Time O(size of the set) to load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modelatlas.distill.evaluate import EvalProtocol
from modelatlas.distill.result import IMAGES_PNG, LOSS_PNG, RESULT_JSON, load_result
from modelatlas.errors import CheckpointError


def stored_result(out: Path, run: dict, proto: EvalProtocol, baseline: bool,
                  saved: dict | None) -> dict | None:
    """``out``'s result.json when it is what this resume would write (module docstring), else None.

    ``run``: ``method``, ``ipc``, ``seed``, ``config`` (the config dataclass), ``init_from``,
    ``dataset_kwargs`` and ``device`` (a torch.device) of this run; ``saved``: its checkpoint.json
    (:func:`~modelatlas.distill.loop.read_checkpoint`, None without one)."""
    if not (saved is not None and (out / RESULT_JSON).is_file() and (out / IMAGES_PNG).is_file()
            and (out / LOSS_PNG).is_file()):
        return None
    try:
        syn, _, info = load_result(out)
    except CheckpointError:
        return None
    cfg = run["config"]
    if not (saved.get("iteration") == saved.get("iterations") == cfg.iterations and saved.get("seed") == run["seed"]
            and _poster_drawn(out, syn) and _poster_recorded(info, cfg)):
        return None
    lr = float(syn.lr.detach()) if syn.lr is not None else None
    protocol = {**proto.resolved(lr).to_dict(), "seed": run["seed"], "device": str(run["device"])}
    now = {"method": run["method"], "ipc": run["ipc"], "seed": run["seed"], "config": cfg.to_dict(),
           "init_from": run["init_from"], "dataset_kwargs": run["dataset_kwargs"], "torch": torch.__version__,
           "losses": saved.get("losses"), "has_baseline": baseline and run["method"] != "random",
           "protocol": protocol}
    evaluation = info.get("evaluation")
    # a poster's result.json records the poster's own (fractional) ipc; the run's is the baseline's
    ipc = info.get("baseline_ipc") if "poster_ipc_target" in info else info.get("ipc")
    then = {**{k: info.get(k) for k in now}, "ipc": ipc, "has_baseline": "baseline_random" in info,
            "protocol": evaluation.get("protocol") if isinstance(evaluation, dict) else None}
    return info if json.loads(json.dumps(now)) == then else None


def _poster_drawn(out: Path, syn) -> bool:
    """A PoDD result keeps its poster.png (the full way redraws it)."""
    if "poster" not in syn.extras:
        return True
    from modelatlas.distill.methods.podd.render import POSTER_PNG

    return (out / POSTER_PNG).is_file()


def _poster_recorded(info: dict, cfg) -> bool:
    """A poster of ``run_poster`` (config ``poster_ipc`` set) has its poster's fields in result.json: before they
    were written with the rest, they came after it, so a run stopped in between left a result.json without them,
    taken as finished."""
    return getattr(cfg, "poster_ipc", None) is None or "poster_ipc_target" in info

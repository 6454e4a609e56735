"""The training loop shared by every expert: Adam, minibatches, best-validation state, resumable.

A resumable checkpoint is two files written atomically in ``checkpoint_dir``: ``train_state.safetensors``
(current weights, best weights, Adam moments) and ``train_state.json`` (epoch, best score, history, Adam
hyperparameters, and the run's settings). Loading never unpickles; it refuses a state whose settings (config,
layer, task, number of models, a digest of the data) differ from the run that asks to resume it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from modelatlas.atomic import atomic_save_tensors, atomic_write_json, read_tensors
from modelatlas.errors import CheckpointError, SettingsMismatchError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import torch_generator

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_loop(module: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, score_fn: Callable[[], tuple[float, float]],
               cfg, progress: Progress | None = None, checkpoint_dir: str | Path | None = None,
               resume: bool = False, run: dict | None = None) -> dict:
    """Train ``module`` on (x, y) for ``cfg.epochs`` epochs; load the best-``score_fn`` state at the end.

    ``score_fn`` returns (score, validation loss) and is evaluated after every epoch in eval mode; the best
    state has the highest score, ties broken by the lower loss (a saturated accuracy would otherwise keep an
    early, barely trained state). Returns the history
    ``{"epoch", "best_epoch", "best_score", "best_loss", "loss": [...], "score": [...]}``. Time O(epochs * N * cost of one
    forward/backward); memory O(batch_size * activation size + 3 * parameters). ``run`` (layer, task, models...)
    and ``cfg`` are saved with the state; resuming a state saved with other settings raises CheckpointError.
    """
    settings = run_settings(cfg, run)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "best_epoch": -1, "best_score": -float("inf"), "best_loss": float("inf"), "loss": [],
             "score": []}
    best = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if resume and checkpoint_dir is not None and (Path(checkpoint_dir) / "train_state.json").exists():
        state, best = _load_state(Path(checkpoint_dir), module, opt, settings, cfg.epochs)
    bar = resolve(progress)(range(state["epoch"], cfg.epochs), total=cfg.epochs - state["epoch"], desc="train")
    for epoch in bar:  # seeds wrap as torch wraps a negative one: a seed near 2**64 would overflow
        mean_loss = _epoch(module, opt, loss_fn, x, y, cfg.batch_size, (cfg.seed + 7919 * epoch) % 2**64)
        module.eval()
        with torch.no_grad():
            score, val_loss = (float(v) for v in score_fn())
        state["loss"].append(mean_loss)
        state["score"].append(score)
        state["epoch"] = epoch + 1
        if (score, -val_loss) > (state["best_score"], -state["best_loss"]):
            state["best_score"], state["best_loss"], state["best_epoch"] = score, val_loss, epoch
            best = {k: v.detach().clone() for k, v in module.state_dict().items()}
        bar.set_postfix(loss=f"{state['loss'][-1]:.4f}", val=f"{score:.3f}")
        if checkpoint_dir is not None and (state["epoch"] % cfg.checkpoint_every == 0 or state["epoch"] == cfg.epochs):
            _save_state(Path(checkpoint_dir), module, opt, best, {**state, "settings": settings})
    module.load_state_dict(best)
    module.eval()
    return state


def _epoch(module: nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
           batch_size: int, seed: int) -> float:
    """One pass over (x, y) in a seeded order (one generator per epoch: a resumed run sees the same order);
    returns the mean batch loss."""
    module.train()
    losses = []
    for idx in torch.randperm(x.shape[0], generator=torch_generator(seed)).split(batch_size):
        loss = loss_fn(x[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


def run_settings(cfg, run: dict | None = None) -> dict:
    """What must match for a saved state to be resumed, as JSON values: ``run`` and the config, but
    ``checkpoint_every`` (how often the state is saved) and ``epochs``: each epoch's batch order depends only on
    the seed and its index, so a run resumed with more epochs equals an uninterrupted run of that many."""
    skip = ("checkpoint_every", "epochs")
    settings = {k: v for k, v in cfg.to_dict().items() if k not in skip} if hasattr(cfg, "to_dict") else {}
    return json.loads(json.dumps({**(run or {}), **settings}))  # the run's keys first: the likelier mistakes


def _check_settings(path: Path, meta: dict, settings: dict, epochs: int) -> None:
    """Refuse to resume a state saved with other settings, naming the first key that differs, or one that
    has already trained more than ``epochs`` epochs (checked last: the state of another run, e.g. on another
    layer, is named by what differs, not by its epochs). Pops the settings from ``meta``."""
    saved = meta.pop("settings", None)
    if not isinstance(saved, dict):
        raise CheckpointError(path, "cannot resume: the state does not record its run's settings (saved by an "
                                    "older modelatlas); train without --resume to start over")
    for key in [*settings, *(k for k in saved if k not in settings)]:
        if key == "data" and key not in saved:  # a state saved before the data was recorded
            continue
        if saved.get(key) != settings.get(key):
            raise SettingsMismatchError(path, key, saved.get(key), settings.get(key),
                                        "train without --resume to start over", _shown)
    if not isinstance(meta.get("epoch"), int) or meta["epoch"] > epochs:
        raise CheckpointError(path, f"cannot resume: epochs is {epochs} now, but the interrupted run has already "
                                    f"trained {meta.get('epoch')!r}; resume with at least as many epochs, or train "
                                    "without --resume to start over")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_progress(path: Path, meta: dict) -> None:
    """The state's progress values have the types a resumed loop uses (a missing one was a KeyError or a
    TypeError traceback), and one loss and score per trained epoch."""
    epoch = meta["epoch"]  # an int, checked with the settings
    kinds = {"loss": (lambda v: isinstance(v, list) and len(v) == epoch and all(map(_is_number, v)),
                      f"a list of {epoch} numbers (one per epoch)"),
             "best_score": (_is_number, "a number"), "best_loss": (_is_number, "a number"),
             "best_epoch": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
             "param_groups": (lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
                              "a list of Adam's settings")}
    kinds["score"] = kinds["loss"]
    for key, (test, words) in kinds.items():
        if not test(meta.get(key)):
            got = "missing" if key not in meta else f"got {_shown(meta[key])}"
            raise CheckpointError(path, f"cannot resume: {key} must be {words}; {got} (delete the folder to restart)")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _save_state(folder: Path, module: nn.Module, opt: torch.optim.Optimizer, best: dict, state: dict) -> None:
    tensors = {f"net.{k}": v for k, v in module.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    tensors["state.epoch"] = torch.tensor(state["epoch"])  # tells a pair of files from two epochs apart
    opt_state = opt.state_dict()
    for i, slots in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in slots.items()})
    # The tensors first, then the JSON: a crash between them leaves an older JSON, refused by _load_state.
    atomic_save_tensors(folder / "train_state.safetensors", tensors)
    atomic_write_json(folder / "train_state.json", {**state, "param_groups": opt_state["param_groups"]})


def _load_state(folder: Path, module: nn.Module, opt: torch.optim.Optimizer, settings: dict,
                epochs: int) -> tuple[dict, dict]:
    try:
        meta = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(folder / "train_state.json", f"cannot resume: {e} (delete the folder to restart)") from e
    if not isinstance(meta, dict):
        raise CheckpointError(folder / "train_state.json", "cannot resume: not a training state (delete the "
                                                           "folder to restart)")
    _check_settings(folder / "train_state.json", meta, settings, epochs)
    _check_progress(folder / "train_state.json", meta)
    tensors = read_tensors(folder / "train_state.safetensors", "cannot resume; delete the folder to restart")
    saved = tensors.get("state.epoch")  # None: saved before the epoch was recorded with the tensors
    if saved is not None and int(saved) != meta["epoch"]:
        raise CheckpointError(folder / "train_state.safetensors", f"cannot resume: it holds epoch {int(saved)}'s "
                                                                  f"state, train_state.json epoch {meta['epoch']}'s "
                                                                  "(saving was interrupted); delete the folder to restart")
    try:
        module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    except RuntimeError as e:
        raise CheckpointError(folder / "train_state.safetensors",
                              "saved state does not match this expert's shape (different layer or ranks?); "
                              "delete it or train without --resume") from e
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, slot = key.split(".", 2)
            slots.setdefault(int(i), {})[slot] = value
    _check_saved_tensors(folder / "train_state.safetensors", module, best, slots)
    try:
        opt.load_state_dict({"state": slots, "param_groups": meta.pop("param_groups")})
    except (KeyError, TypeError, ValueError) as e:  # e.g. another number of parameter groups
        raise CheckpointError(folder / "train_state.json", f"cannot resume: Adam's saved settings do not fit this "
                                                           f"expert ({e}); delete it or train without --resume") from e
    return meta, best


def _check_saved_tensors(path: Path, module: nn.Module, best: dict, slots: dict) -> None:
    """The best weights and Adam's moments fit the module: without the best weights the end of training was a
    load_state_dict traceback, and a missing or misshapen moment failed at the first step."""
    want = {f"best.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
    got = {f"best.{k}": tuple(v.shape) for k, v in best.items()}
    params = list(module.parameters())
    for i, slot in slots.items():
        shape = tuple(params[i].shape) if 0 <= i < len(params) else ()
        want.update({f"opt.{i}.{m}": shape for m in ("exp_avg", "exp_avg_sq")})
        got.update({f"opt.{i}.{m}": tuple(v.shape) for m, v in slot.items()})
    bad = next((k for k, shape in want.items() if got.get(k) != shape), None)
    if bad is not None:
        raise CheckpointError(path, f"cannot resume: tensor {bad!r} is missing or of another shape; delete it or "
                                    "train without --resume")

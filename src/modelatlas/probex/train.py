"""The training loop shared by every expert: Adam, minibatches, best-validation state, resumable.

A resumable checkpoint is two files written atomically in ``checkpoint_dir``: ``train_state.safetensors``
(current weights, best weights, Adam moments) and ``train_state.json`` (epoch, best score, history, Adam
hyperparameters). Loading never unpickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from modelatlas.atomic import atomic_save_tensors, atomic_write_json, read_tensors
from modelatlas.errors import CheckpointError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import torch_generator

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_loop(module: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, score_fn: Callable[[], tuple[float, float]],
               cfg, progress: Progress | None = None, checkpoint_dir: str | Path | None = None,
               resume: bool = False) -> dict:
    """Train ``module`` on (x, y) for ``cfg.epochs`` epochs; load the best-``score_fn`` state at the end.

    ``score_fn`` returns (score, validation loss) and is evaluated after every epoch in eval mode; the best
    state has the highest score, ties broken by the lower loss (a saturated accuracy would otherwise keep an
    early, barely trained state). Returns the history
    ``{"epoch", "best_epoch", "best_score", "best_loss", "loss": [...], "score": [...]}``. Time O(epochs * N * cost of one
    forward/backward); memory O(batch_size * activation size + 3 * parameters).
    """
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "best_epoch": -1, "best_score": -float("inf"), "best_loss": float("inf"), "loss": [],
             "score": []}
    best = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if resume and checkpoint_dir is not None and (Path(checkpoint_dir) / "train_state.json").exists():
        state, best = _load_state(Path(checkpoint_dir), module, opt)
    bar = resolve(progress)(range(state["epoch"], cfg.epochs), total=cfg.epochs - state["epoch"], desc="train")
    for epoch in bar:
        mean_loss = _epoch(module, opt, loss_fn, x, y, cfg.batch_size, cfg.seed + 7919 * epoch)
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
            _save_state(Path(checkpoint_dir), module, opt, best, state)
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


def _save_state(folder: Path, module: nn.Module, opt: torch.optim.Optimizer, best: dict, state: dict) -> None:
    tensors = {f"net.{k}": v for k, v in module.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    opt_state = opt.state_dict()
    for i, slots in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in slots.items()})
    # The tensors first, then the JSON: a crash between them leaves an older JSON that still matches.
    atomic_save_tensors(folder / "train_state.safetensors", tensors)
    atomic_write_json(folder / "train_state.json", {**state, "param_groups": opt_state["param_groups"]})


def _load_state(folder: Path, module: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    try:
        meta = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(folder / "train_state.json", f"cannot resume: {e} (delete the folder to restart)") from e
    tensors = read_tensors(folder / "train_state.safetensors", "cannot resume; delete the folder to restart")
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
    opt.load_state_dict({"state": slots, "param_groups": meta.pop("param_groups")})
    return meta, best

"""The expert-trajectory buffer of MTT: per-epoch parameter snapshots of networks trained on real data.

Trained once and cached as safetensors (one (epochs + 1, P) tensor per expert, written atomically) in the
cache (:mod:`modelatlas.distill.cache`) under a key hashing everything that determines the trajectories: a fingerprint of the training tensors, the network,
the expert settings and the seed. A second run with the same key loads the file instead of training.
Until it is complete, each finished expert is kept in ``buffer-<key>.partial/expert<e>.safetensors``
(:class:`~modelatlas.distill.cache.UnitStore`): a Ctrl-C or a crash loses only the expert in progress.
Training costs ``num_experts x expert_epochs`` epochs over the real data; memory O(num_experts x epochs x P).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from modelatlas.atomic import atomic_save_tensors, read_tensors
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.augment import DSA
from modelatlas.distill.cache import UnitStore, cache_key, cache_root, check_cache_folder
from modelatlas.distill.evaluate import soft_cross_entropy
from modelatlas.distill.interrupt import deferred_interrupt
from modelatlas.distill.methods.mtt.config import MTTConfig
from modelatlas.distill.nets import make_net
from modelatlas.errors import CheckpointError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator

STOP_MESSAGE = ("interrupted: finishing the expert in progress and keeping it, then stopping; a rerun trains only "
                "the missing experts (Ctrl-C again to stop at once, losing that expert)")


def buffer_key(train: ArrayDataset, cfg: MTTConfig, seed: int) -> str:
    """A stable hash of the data fingerprint, net and expert settings (same key -> same trajectories)."""
    fields = {"net": cfg.net_spec(train.input_shape), "experts": cfg.num_experts, "epochs": cfg.expert_epochs,
              "lr": cfg.lr_teacher, "batch": cfg.batch_expert, "dsa": cfg.dsa}
    return cache_key(train, fields, seed, length=20)


def flatten(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])  # (P,)


def train_expert(train: ArrayDataset, cfg: MTTConfig, seed: int, e: int, device, dsa: DSA | None,
                 progress: Progress | None = None) -> torch.Tensor:
    """One expert's trajectory (expert_epochs + 1, P): SGD on the real data, a snapshot after every epoch
    (``progress``: a bar over the epochs, 'mtt: train expert 1/3')."""
    spec = cfg.net_spec(train.input_shape)
    net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"],
                   seed=derive_seed(seed, "expert", e), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr_teacher)
    gen = torch_generator(derive_seed(seed, "expert-batches", e))
    x, y = train.x.to(device), train.y.to(device)
    snaps = [flatten(net.parameters()).cpu()]
    bar = resolve(progress)(range(cfg.expert_epochs), total=cfg.expert_epochs,
                            desc=f"mtt: train expert {e + 1}/{cfg.num_experts}")
    for _ in bar:
        order = torch.randperm(len(x), generator=gen).to(device)
        for b in range(math.ceil(len(x) / cfg.batch_expert)):
            idx = order[b * cfg.batch_expert:(b + 1) * cfg.batch_expert]
            xb = x[idx] if dsa is None else dsa.sample(gen, batch=len(idx)).apply(x[idx])
            loss = soft_cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        snaps.append(flatten(net.parameters()).cpu())
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    return torch.stack(snaps)  # (epochs + 1, P)


def load_or_train(train: ArrayDataset, cfg: MTTConfig, seed: int, device, dsa: DSA | None,
                  progress: Progress | None = None) -> tuple[torch.Tensor, Path]:
    """The buffer (num_experts, epochs + 1, P) and its file; trains and caches it when absent, a ``progress``
    bar per expert (the first run's long part: on Fashion-MNIST its epochs took hours with nothing shown).
    Each expert is kept as it ends (:func:`train_experts`): an interrupted first run loses one expert, not all."""
    path = cache_root("mtt", cfg.cache_dir) / f"buffer-{buffer_key(train, cfg, seed)}.safetensors"
    if path.is_file():
        return _cached(path, train, cfg), path
    check_cache_folder(path.parent, cfg.cache_dir)
    units = UnitStore(path.with_suffix(".partial"), device)
    experts, stop = train_experts(train, cfg, seed, device, dsa, units, progress)
    names = [f"expert{e}" for e in range(cfg.num_experts)]
    atomic_save_tensors(path, dict(zip(names, experts)),
                        {"key": path.stem, "device": units.devices(names)})  # CPU tensors (cache.py: no device key)
    units.remove(names)
    if stop:  # a Ctrl-C during the last expert: it is kept with the buffer, then the run stops
        raise KeyboardInterrupt
    return torch.stack(experts), path


def train_experts(train: ArrayDataset, cfg: MTTConfig, seed: int, device, dsa: DSA | None, units: UnitStore,
                  progress: Progress | None = None) -> tuple[list[torch.Tensor], bool]:
    """(the trajectories, whether a Ctrl-C asked to stop): the experts kept in ``units`` are read, the others
    trained and kept one by one. Expert e depends on (key, e) alone, so the buffer is bit-for-bit the one of an
    uninterrupted run. A first Ctrl-C finishes and keeps the expert in progress, then stops (KeyboardInterrupt);
    a second stops at once."""
    spec = cfg.net_spec(train.input_shape)
    net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"])
    shapes = {"trajectory": (cfg.expert_epochs + 1, sum(p.numel() for p in net.parameters()))}
    experts: list[torch.Tensor] = []
    with deferred_interrupt(message=STOP_MESSAGE) as stopping:
        for e in range(cfg.num_experts):
            kept = units.get(f"expert{e}", shapes)
            if kept is None:
                kept = {"trajectory": train_expert(train, cfg, seed, e, device, dsa, progress)}
                units.put(f"expert{e}", kept)
            experts.append(kept["trajectory"])
            if stopping() and e < cfg.num_experts - 1:
                raise KeyboardInterrupt
        return experts, stopping()


def _cached(path: Path, train: ArrayDataset, cfg: MTTConfig) -> torch.Tensor:
    """The cached buffer, checked to be (num_experts, expert_epochs + 1, P) finite trajectories of this net:
    another shape stopped MTT with a reshape / index error, NaN as 'diverged'."""
    tensors = read_tensors(path, "delete it to retrain the experts")
    spec = cfg.net_spec(train.input_shape)
    net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"])
    want = (cfg.num_experts, cfg.expert_epochs + 1, sum(p.numel() for p in net.parameters()))
    try:
        buf = torch.stack([tensors[f"expert{e}"] for e in range(cfg.num_experts)])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(path, f"not an expert buffer of this config ({err}); delete it to retrain") from None
    if tuple(buf.shape) != want or not bool(torch.isfinite(buf).all()):
        raise CheckpointError(path, f"not an expert buffer of this config (finite trajectories of shape {want}, "
                                    f"got {tuple(buf.shape)}); delete it to retrain")
    return buf

"""Teddy's pre-cached pool of weak models, generated from one base model (Yu et al., ECCV 2024, sec. 3.3).

- "prior": early checkpoints of the base model's training on real data (SGD, ``lr_net``), evenly spaced over
  its first ``prior_fraction`` of ``base_steps`` (weak, still-learning models);
- "post": the trained base model, magnitude-pruned (the ``prune_ratio`` smallest |w| of every weight
  matrix/kernel set to 0) and fine-tuned ``finetune_steps`` SGD steps with the mask kept and its own data order.

The pool is built once and stored as ``model-<i>.safetensors`` + ``pool.json`` in a folder of the cache
(:mod:`modelatlas.distill.cache`) named by a hash of (dataset fingerprint, pool fields, seed); a later run with the same key loads it instead of
training (``pool.json`` is written last: a crash mid-build leaves no half pool taken for a whole one). The
model files are written as each is trained (:class:`~modelatlas.distill.cache.UnitStore`), so a build stopped
by a Ctrl-C or a crash goes on from them on the next run: a base model's checkpoints, each post model.
Build cost O((base_steps + pool_size x finetune_steps) x batch x net cost); storage O(pool_size x #params).
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelatlas.atomic import atomic_write_json, read_tensors
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.cache import UnitStore, cache_key, cache_root, check_cache_folder
from modelatlas.distill.evaluate import soft_cross_entropy
from modelatlas.distill.interrupt import deferred_interrupt
from modelatlas.distill.loop import read_json
from modelatlas.distill.methods.teddy.config import prior_count
from modelatlas.distill.nets import make_net
from modelatlas.errors import CheckpointError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator

POOL_JSON = "pool.json"
BASE_TRAINED = "base-trained"  # base 0 after base_steps: the post models' start, kept until the pool is whole
STOP_MESSAGE = ("interrupted: finishing the pool model in progress and keeping it, then stopping; a rerun trains "
                "only the missing ones (Ctrl-C again to stop at once, losing that model)")


def _sgd_steps(net, train: ArrayDataset, steps: int, lr: float, batch: int, gen, masks=None, on_step=None,
               bar=None):
    """``steps`` SGD steps on random real batches; ``bar``: (progress, description) of a bar over them."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    dev = next(net.parameters()).device
    progress, desc = bar if bar is not None else (None, "")
    for s in resolve(progress)(range(steps), total=steps, desc=desc):
        idx = torch.randint(len(train), (min(batch, len(train)),), generator=gen)
        loss = soft_cross_entropy(net(train.x[idx].to(dev)), train.y[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if masks is not None:
            with torch.no_grad():
                for p, m in zip(net.parameters(), masks):
                    if m is not None:
                        p.mul_(m)
        if on_step is not None:
            on_step(s + 1, net)


def magnitude_masks(net: torch.nn.Module, ratio: float) -> list[torch.Tensor | None]:
    """Per weight tensor (dim > 1) a 0/1 mask keeping the ``1 - ratio`` largest |w|; None for 1-D tensors."""
    masks = []
    for p in net.parameters():
        if p.dim() < 2 or ratio <= 0:
            masks.append(None)
            continue
        k = int(p.numel() * ratio)
        thresh = p.detach().abs().flatten().kthvalue(max(k, 1)).values
        masks.append((p.detach().abs() > thresh).to(p.dtype))
    return masks


def _prior_checkpoints(train: ArrayDataset, fields: dict, spec: dict, seed: int, device, base: int,
                       count: int, pool: list, full: bool, progress: Progress | None = None) -> torch.nn.Module:
    """Train base model ``base``; append ``count`` checkpoints evenly spaced over its first ``prior_fraction``
    of ``base_steps`` to ``pool``; return the net after all ``base_steps`` when ``full``, else stopped at the
    last checkpoint (its later steps would change nothing). Base 0 keeps the one-base pool's seeds."""
    tag = () if base == 0 else (base,)
    net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"],
                   seed=derive_seed(seed, "teddy-base", *tag), device=device)
    last = max(1, int(fields["base_steps"] * fields["prior_fraction"]))
    marks = [max(1, round(last * (i + 1) / count)) for i in range(count)]  # may repeat when last < count

    def keep(step: int, net) -> None:
        for _ in range(marks.count(step)):
            pool.append({k: v.detach().cpu().clone() for k, v in net.state_dict().items()})

    _sgd_steps(net, train, fields["base_steps"] if full else last, fields["lr_net"], fields["batch_real"],
               torch_generator(derive_seed(seed, "teddy-base-data", *tag)), on_step=keep,
               bar=(progress, f"teddy: train pool base {base + 1}/{fields['pool_bases']}"))
    return net


def build_pool(train: ArrayDataset, fields: dict, spec: dict, seed: int, device, units: UnitStore,
               progress: Progress | None = None) -> tuple[list[dict[str, torch.Tensor]], bool]:
    """(the ``pool_size`` weak models as CPU state dicts, whether a Ctrl-C asked to stop): those kept in
    ``units`` are read, the others trained (a bar per base model and per fine-tuned one) and kept as each unit
    ends: a base model's checkpoints, one post model. A model depends on (key, its index) alone, so the pool is
    the one of an uninterrupted build. A first Ctrl-C finishes the unit in progress, then stops.

    The prior checkpoints are split as evenly as possible over ``pool_bases`` base models (different seeds);
    the post models all come from base 0 (its trained state kept as the unit ``base-trained``)."""
    n_prior = prior_count(fields["pool_kind"], fields["pool_size"])
    n_post, bases = fields["pool_size"] - n_prior, fields["pool_bases"]
    per_base = [n_prior // bases + (b < n_prior % bases) for b in range(bases)]
    shapes = {k: tuple(v.shape) for k, v in make_net(spec["net"], train.input_shape, train.num_classes,
                                                      spec["width"], spec["depth"]).state_dict().items()}
    pool: list[dict[str, torch.Tensor]] = []
    with deferred_interrupt(message=STOP_MESSAGE) as stopping:
        for b in range(bases):
            names = [f"model-{len(pool) + j}" for j in range(per_base[b])]
            kept = [units.get(n, shapes) for n in names]
            if any(k is None for k in kept):
                full = b == 0 and n_post > 0 and not units.path(BASE_TRAINED).is_file()
                kept = []
                net = _prior_checkpoints(train, fields, spec, seed, device, b, per_base[b], kept, full, progress)
                for n, state in zip(names, kept):
                    units.put(n, state)
                if full:
                    units.put(BASE_TRAINED, _cpu_state(net))
            pool.extend(kept)
            _stop_if(stopping, len(pool) < fields["pool_size"])
        for i in range(n_post):
            pool.append(units.get(f"model-{n_prior + i}", shapes)
                        or _post_model(train, fields, spec, seed, device, units, shapes, i, progress))
            _stop_if(stopping, len(pool) < fields["pool_size"])
        return pool, stopping()


def _stop_if(stopping, more: bool) -> None:
    """Stop after the unit just kept when a Ctrl-C asked to and units remain (after the last one, the pool is
    cached whole first)."""
    if more and stopping():
        raise KeyboardInterrupt


def _cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _post_model(train: ArrayDataset, fields: dict, spec: dict, seed: int, device, units: UnitStore, shapes: dict,
                i: int, progress: Progress | None) -> dict[str, torch.Tensor]:
    """Post model ``i`` (kept as ``model-<n_prior + i>``): base 0's trained state (kept, else trained again),
    magnitude-pruned and fine-tuned with the mask kept and its own data order."""
    trained = units.get(BASE_TRAINED, shapes)
    if trained is None:
        net = _prior_checkpoints(train, fields, spec, seed, device, 0, 1, [], True, progress)
        units.put(BASE_TRAINED, trained := _cpu_state(net))
    base = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"], device=device)
    base.load_state_dict(trained)
    masks = magnitude_masks(base, fields["prune_ratio"])
    with torch.no_grad():
        for p, m in zip(base.parameters(), masks):
            if m is not None:
                p.mul_(m)
    n_post = fields["pool_size"] - prior_count(fields["pool_kind"], fields["pool_size"])
    _sgd_steps(base, train, fields["finetune_steps"], fields["lr_net"], fields["batch_real"],
               torch_generator(derive_seed(seed, "teddy-post", i)), masks=masks,
               bar=(progress, f"teddy: fine-tune pruned model {i + 1}/{n_post}"))
    units.put(f"model-{fields['pool_size'] - n_post + i}", state := _cpu_state(base))
    return state


def load_or_build_pool(train: ArrayDataset, fields: dict, spec: dict, seed: int, device,
                       cache_dir: str | Path | None = None,
                       progress: Progress | None = None) -> tuple[list[dict[str, torch.Tensor]], Path, bool]:
    """(pool, its folder, built_now). Loads the cached pool when its ``pool.json`` exists; else builds it,
    reading the models an interrupted build kept in the folder (:func:`build_pool`)."""
    folder = cache_root("teddy", cache_dir) / f"pool-{cache_key(train, {**fields, **spec}, seed)}"
    meta_path = folder / POOL_JSON
    if meta_path.is_file():
        net = make_net(spec["net"], train.input_shape, train.num_classes, spec["width"], spec["depth"])
        return _cached_pool(folder, fields["pool_size"], net), folder, False
    check_cache_folder(folder, cache_dir)
    units = UnitStore(folder, device)
    pool, stop = build_pool(train, fields, spec, seed, device, units, progress)
    names = [f"model-{i}" for i in range(len(pool))]
    atomic_write_json(meta_path, {"files": [f"{n}.safetensors" for n in names], "fields": fields, "net": spec,
                                  "seed": seed, "dataset": train.name, "kinds": _kinds(fields),
                                  "device": units.devices(names)})
    units.remove([BASE_TRAINED])
    if stop:  # a Ctrl-C during the last unit: the pool is cached whole, then the run stops
        raise KeyboardInterrupt
    return pool, folder, True


def _kinds(fields: dict) -> list[str]:
    n_prior = prior_count(fields["pool_kind"], fields["pool_size"])
    return ["prior"] * n_prior + ["post"] * (fields["pool_size"] - n_prior)


def _cached_pool(folder: Path, size: int, net: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """The pool stored in ``folder``, checked: a damaged ``pool.json`` or model file is named (it stopped Teddy
    with a KeyError / TypeError, an empty list with a randint error, another net's weights in load_state_dict)."""
    hint, meta_path = "delete the pool folder to rebuild", folder / POOL_JSON
    files = read_json(meta_path, hint).get("files")
    if not (isinstance(files, list) and len(files) == size and all(isinstance(f, str) and f == Path(f).name
                                                                   for f in files)):
        raise CheckpointError(meta_path, f"'files' must list the pool's {size} model files (names in its folder); "
                                         f"{hint}")
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    pool = []
    for f in files:
        pool.append(read_tensors(folder / f, hint))
        if {k: tuple(v.shape) for k, v in pool[-1].items()} != want:
            raise CheckpointError(folder / f, f"is not a model of this pool's network; {hint}")
    return pool

"""Teddy's pre-cached pool of weak models, generated from one base model (Yu et al., ECCV 2024, sec. 3.3).

- "prior": early checkpoints of the base model's training on real data (SGD, ``lr_net``), evenly spaced over
  its first ``prior_fraction`` of ``base_steps`` (weak, still-learning models);
- "post": the trained base model, magnitude-pruned (the ``prune_ratio`` smallest |w| of every weight
  matrix/kernel set to 0) and fine-tuned ``finetune_steps`` SGD steps with the mask kept and its own data order.

The pool is built once and stored as ``model-<i>.safetensors`` + ``pool.json`` in a folder of the cache
(:mod:`modelatlas.distill.cache`) named by a hash of (dataset fingerprint, pool fields, seed); a later run with the same key loads it instead of
training (``pool.json`` is written last: a crash mid-build leaves no half pool taken for a whole one). The
model files are written as each is trained (:class:`~modelatlas.distill.cache.UnitStore`), so a build stopped
by a Ctrl-C or a crash goes on from them on the next run: a base model from its last kept checkpoint (its
net, SGD momentum and data generator kept beside it as ``base-<b>-resume``), then each missing post model.
Build cost O((base_steps + pool_size x finetune_steps) x batch x net cost); storage O(pool_size x #params).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from modelatlas.atomic import atomic_write_json, read_tensors
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.cache import UnitStore, cache_key, cache_root, check_cache_folder
from modelatlas.distill.evaluate import soft_cross_entropy
from modelatlas.distill.interrupt import deferred_interrupt
from modelatlas.distill.loop import read_json
from modelatlas.distill.methods.teddy.config import prior_count
from modelatlas.distill.nets import make_net
from modelatlas.errors import CacheWarning, CheckpointError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator

POOL_JSON = "pool.json"
BASE_TRAINED = "base-trained"  # base 0 after base_steps: the post models' start, kept until the pool is whole
STOP_MESSAGE = ("interrupted: finishing the pool model in progress and keeping it, then stopping; a rerun trains "
                "only the missing ones (Ctrl-C again to stop at once, losing that model)")


def _sgd_steps(net, train: ArrayDataset, steps: int, lr: float, batch: int, gen, masks=None, on_step=None,
               bar=None, start: int = 0, momentum: list[torch.Tensor] | None = None):
    """Steps ``start`` .. ``steps`` - 1 of SGD on random real batches; ``momentum``: the optimizer's buffers
    after step ``start`` (to go on from a kept state); ``on_step(step, net, opt)`` after each step; ``bar``:
    (progress, description) of a bar over them."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for p, m in zip(net.parameters(), momentum or []):
        opt.state[p]["momentum_buffer"] = m.to(p.device).clone()
    dev = next(net.parameters()).device
    progress, desc = bar if bar is not None else (None, "")
    for s in resolve(progress)(range(start, steps), total=steps - start, desc=desc):
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
            on_step(s + 1, net, opt)


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


class _Build(NamedTuple):
    """What every unit of one pool build shares (``shapes``: the network's state-dict shapes)."""
    train: ArrayDataset
    fields: dict
    spec: dict
    seed: int
    device: object
    units: UnitStore
    shapes: dict
    progress: Progress | None
    stopping: Callable[[], bool]


def _train_base(job: _Build, base: int, first: int, count: int, full: bool) -> tuple[list, torch.nn.Module]:
    """(``count`` checkpoints of base model ``base`` evenly spaced over its first ``prior_fraction`` of
    ``base_steps``, its net: after all ``base_steps`` when ``full``, else stopped at the last checkpoint). Each
    checkpoint is kept as ``model-<first + j>`` when reached, with the state to go on from it (``base-<b>-resume``:
    net, SGD momentum, data generator), so a rerun resumes the base there. Base 0 keeps the one-base pool's seeds."""
    tag, f = () if base == 0 else (base,), job.fields
    net = make_net(job.spec["net"], job.train.input_shape, job.train.num_classes, job.spec["width"],
                   job.spec["depth"], seed=derive_seed(job.seed, "teddy-base", *tag), device=job.device)
    gen = torch_generator(derive_seed(job.seed, "teddy-base-data", *tag))
    last = max(1, int(f["base_steps"] * f["prior_fraction"]))
    marks = [max(1, round(last * (i + 1) / count)) for i in range(count)]  # may repeat when last < count
    ckpts, start, momentum = _resume_base(job, base, first, marks, net, gen)

    def keep(step: int, net, opt) -> None:
        if step not in marks:
            return
        for _ in range(marks.count(step)):
            ckpts.append(_cpu_state(net))
            job.units.put(f"model-{first + len(ckpts) - 1}", ckpts[-1])
        job.units.put(f"base-{base}-resume", {**{f"net.{k}": v for k, v in ckpts[-1].items()},
                                              **{f"momentum.{i}": opt.state[p]["momentum_buffer"]
                                                 for i, p in enumerate(net.parameters())},
                                              "gen": gen.get_state(), "step": torch.tensor(step),
                                              "taken": torch.tensor(len(ckpts))})
        if job.stopping():
            raise KeyboardInterrupt
    _sgd_steps(net, job.train, f["base_steps"] if full else last, f["lr_net"], f["batch_real"], gen,
               on_step=keep, bar=(job.progress, f"teddy: train pool base {base + 1}/{f['pool_bases']}"),
               start=start, momentum=momentum)
    return ckpts, net


def _resume_base(job: _Build, base: int, first: int, marks: list[int], net, gen) -> tuple[list, int, list | None]:
    """(checkpoints kept, step, momentum) to go on from, ``net`` and ``gen`` set to that step; ([], 0, None) when
    base ``base`` kept no state to go on from, or one that does not fit (one warning line)."""
    params = list(net.parameters())
    want = {**{f"net.{k}": v for k, v in job.shapes.items()}, "step": (), "taken": (),
            **{f"momentum.{i}": tuple(p.shape) for i, p in enumerate(params)}, "gen": tuple(gen.get_state().shape)}
    name = f"base-{base}-resume"
    state = job.units.get(name, want)
    if state is None:
        return [], 0, None
    taken, step = int(state["taken"]), int(state["step"])
    ckpts = [job.units.get(f"model-{first + j}", job.shapes) for j in range(taken)] if 0 < taken <= len(marks) else []
    if not ckpts or any(c is None for c in ckpts) or step != marks[taken - 1] or state["gen"].dtype != torch.uint8:
        warnings.warn(f"{job.units.path(name)}: does not fit the checkpoints kept; training base {base + 1} again",
                      CacheWarning, stacklevel=2)
        return [], 0, None
    gen.set_state(state["gen"])
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    return ckpts, step, [state[f"momentum.{i}"] for i in range(len(params))]


def build_pool(train: ArrayDataset, fields: dict, spec: dict, seed: int, device, units: UnitStore,
               progress: Progress | None = None) -> tuple[list[dict[str, torch.Tensor]], bool]:
    """(the ``pool_size`` weak models as CPU state dicts, whether a Ctrl-C asked to stop): those kept in
    ``units`` are read, the others trained (a bar per base model and per fine-tuned one) and kept as each is
    reached: a base model's checkpoint (:func:`_train_base`), a post model. A model depends on (key, its index)
    alone, so the pool is the one of an uninterrupted build. A first Ctrl-C finishes the model in progress,
    then stops.

    The prior checkpoints are split as evenly as possible over ``pool_bases`` base models (different seeds);
    the post models all come from base 0 (its trained state kept as the unit ``base-trained``)."""
    n_prior = prior_count(fields["pool_kind"], fields["pool_size"])
    n_post, bases = fields["pool_size"] - n_prior, fields["pool_bases"]
    per_base = [n_prior // bases + (b < n_prior % bases) for b in range(bases)]
    shapes = {k: tuple(v.shape) for k, v in make_net(spec["net"], train.input_shape, train.num_classes,
                                                      spec["width"], spec["depth"]).state_dict().items()}
    pool: list[dict[str, torch.Tensor]] = []
    with deferred_interrupt(message=STOP_MESSAGE) as stopping:
        job = _Build(train, fields, spec, seed, device, units, shapes, progress, stopping)
        for b in range(bases):
            kept = [units.get(f"model-{len(pool) + j}", shapes) for j in range(per_base[b])]
            if any(k is None for k in kept):
                full = b == 0 and n_post > 0 and not units.path(BASE_TRAINED).is_file()
                kept, net = _train_base(job, b, len(pool), per_base[b], full)
                if full:
                    units.put(BASE_TRAINED, _cpu_state(net))
            pool.extend(kept)
            _stop_if(stopping, len(pool) < fields["pool_size"])
        for i in range(n_post):
            pool.append(units.get(f"model-{n_prior + i}", shapes) or _post_model(job, per_base[0], i))
            _stop_if(stopping, len(pool) < fields["pool_size"])
        return pool, stopping()


def _stop_if(stopping, more: bool) -> None:
    """Stop after the unit just kept when a Ctrl-C asked to and units remain (after the last one, the pool is
    cached whole first)."""
    if more and stopping():
        raise KeyboardInterrupt


def _cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _post_model(job: _Build, n_base0: int, i: int) -> dict[str, torch.Tensor]:
    """Post model ``i`` (kept as ``model-<n_prior + i>``): base 0's trained state (kept, else trained again from
    its last kept checkpoint), magnitude-pruned and fine-tuned with the mask kept and its own data order."""
    f = job.fields
    trained = job.units.get(BASE_TRAINED, job.shapes)
    if trained is None:
        job.units.put(BASE_TRAINED, trained := _cpu_state(_train_base(job, 0, 0, n_base0, True)[1]))
    base = make_net(job.spec["net"], job.train.input_shape, job.train.num_classes, job.spec["width"],
                    job.spec["depth"], device=job.device)
    base.load_state_dict(trained)
    masks = magnitude_masks(base, f["prune_ratio"])
    with torch.no_grad():
        for p, m in zip(base.parameters(), masks):
            if m is not None:
                p.mul_(m)
    n_post = f["pool_size"] - prior_count(f["pool_kind"], f["pool_size"])
    _sgd_steps(base, job.train, f["finetune_steps"], f["lr_net"], f["batch_real"],
               torch_generator(derive_seed(job.seed, "teddy-post", i)), masks=masks,
               bar=(job.progress, f"teddy: fine-tune pruned model {i + 1}/{n_post}"))
    job.units.put(f"model-{f['pool_size'] - n_post + i}", state := _cpu_state(base))
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
    units.remove([BASE_TRAINED, *(f"base-{b}-resume" for b in range(fields["pool_bases"]))])
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

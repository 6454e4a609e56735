"""Zoo families for ProbeX benchmarks and tests, trained many models at a time.

- ``class_subset_star``: per tree, one root MLP trained on every class, then ``children`` fine-tunes, each on
  a random subset of the classes (``task["classes"]``: the multi-hot target of Task A).
- ``named_class_star``: one root, then fine-tunes that each specialise in one *named* class: a digit under
  an input transform named in words ("a handwritten seven, upside down"); ``task["label"]`` is the prompt
  (Task B). The fine-tune sees the transformed images and weights its digit's loss ``focus`` times higher.

Models use the zoo's MLP layout (``embed``, ``layers.0``, ``layers.1``, ``classifier``) and are written as
``.safetensors`` files with a zoo manifest (:mod:`modelatlas.zoo.manifest`). All children of a batch train
together as stacked weights (batched matmuls, one Adam per model, each with its own learning rate and number
of steps), which makes 1,000 fine-tunes take minutes on one core. Same seed, same weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modelatlas.atomic import atomic_save_tensors
from modelatlas.errors import ConfigError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator
from modelatlas.zoo.manifest import Manifest, ModelRecord

LAYERS = ("embed", "layers.0", "layers.1", "classifier")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRANSFORMS = {  # name -> (words, function on (N, 1, 8, 8) images)
    "identity": ("", lambda x: x),
    "vflip": (", upside down", lambda x: torch.flip(x, dims=(-2,))),
    "hflip": (", mirrored left to right", lambda x: torch.flip(x, dims=(-1,))),
    "invert": (", with inverted colours", lambda x: 1.0 - x),
    "rot90": (", rotated a quarter turn", lambda x: torch.rot90(x, 1, dims=(-2, -1))),
    "transpose": (", transposed along the diagonal", lambda x: x.transpose(-2, -1)),
}


def prompt(digit: int, transform: str) -> str:
    """The text naming a (digit, transform) class, e.g. "a handwritten seven, upside down"."""
    return f"a handwritten {DIGITS[digit]}{TRANSFORMS[transform][0]}"


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from modelatlas.data.registry import load_dataset

    ds = load_dataset("digits", "train")
    return ds.x, ds.y  # (N, 1, 8, 8), (N,)


def _init(n: int, sizes: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Stacked nn.Linear-style initialisation for ``n`` models: name -> (n, out, in) / (n, out)."""
    params = {}
    for name, (d_in, d_out) in zip(LAYERS, zip(sizes[:-1], sizes[1:])):
        bound = 1 / math.sqrt(d_in)
        params[f"{name}.weight"] = (torch.rand(n, d_out, d_in, generator=gen) * 2 - 1) * bound
        params[f"{name}.bias"] = (torch.rand(n, d_out, generator=gen) * 2 - 1) * bound
    return params


def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of every stacked model: x (n, N, D) -> (n, N, classes)."""
    h = x.expand(params["embed.weight"].shape[0], -1, -1)  # shared inputs: (1, N, D) -> (n, N, D)
    for i, name in enumerate(LAYERS):
        h = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), h, params[f"{name}.weight"].transpose(1, 2))
        if i < len(LAYERS) - 1:
            h = torch.relu(h)
    return h


def train_stacked(params, inputs, labels, weights, lrs, steps, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Adam on n stacked models at once. inputs (n, N, D) or (1, N, D), labels (N,), weights (n, N) sample
    weights (0 drops a sample), lrs/steps (n,) per model. Time O(max(steps) * n * batch * params)."""
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    gen = torch_generator(seed)
    for t in range(1, int(steps.max()) + 1):
        idx = torch.randint(0, labels.shape[0], (batch,), generator=gen)
        logits = forward(params, inputs[:, idx])  # (n, batch, classes)
        ce = F.cross_entropy(logits.transpose(1, 2), labels[idx].expand(logits.shape[0], -1), reduction="none")
        w = weights[:, idx]  # (n, batch)
        loss = ((ce * w).sum(1) / w.sum(1).clamp_min(1e-8)).sum()  # models are independent: sum their losses
        grads = torch.autograd.grad(loss, list(params.values()))
        active = (steps >= t).float() * lrs  # a model whose steps are done stops moving
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads):
                m[k].mul_(0.9).add_(g, alpha=0.1)
                v2[k].mul_(0.999).addcmul_(g, g, value=0.001)
                step = (m[k] / (1 - 0.9**t)) / ((v2[k] / (1 - 0.999**t)).sqrt() + 1e-8)
                p.sub_(active.view(-1, *[1] * (p.ndim - 1)) * step)
    return {k: v.detach() for k, v in params.items()}


def _unstack(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i].clone() for k, v in params.items()}


def _train_root(x: torch.Tensor, y: torch.Tensor, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    sizes = [x[0].numel(), hidden, hidden, hidden, 10]
    params = _init(1, sizes, torch_generator(seed))
    flat = x.reshape(1, x.shape[0], -1)  # (1, N, 64)
    return train_stacked(params, flat, y, torch.ones(1, len(y)), torch.tensor([3e-3]), torch.tensor([400]),
                         128, derive_seed(seed, "root"))


def _ranges(n: int, seed: int, steps_range, lr_range) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    steps = torch.as_tensor(rng.integers(steps_range[0], steps_range[1] + 1, n))
    lrs = torch.as_tensor(np.exp(rng.uniform(np.log(lr_range[0]), np.log(lr_range[1]), n)), dtype=torch.float32)
    return steps, lrs


def _save_model(folder: Path, name: str, params: dict[str, torch.Tensor]) -> str:
    atomic_save_tensors(folder / f"{name}.safetensors", params)
    return f"{name}.safetensors"


def _manifest(records: list, config: dict, folder: Path) -> Manifest:
    """The family's manifest with each model's weights digest, so that `atlas zoo verify` can check it."""
    from dataclasses import replace

    from modelatlas.zoo.store import weights_digest

    return Manifest([replace(r, sha256=weights_digest(folder / r.path)) for r in records], config, folder)


def _cached(folder: Path, config: dict) -> Manifest | None:
    from modelatlas.zoo.manifest import load_manifest

    if (folder / "manifest.json").exists():
        manifest = load_manifest(folder)
        if manifest.config == config:
            return manifest
    return None


def _fine_tune_batches(root, inputs, y, weights, config: dict, seed: int, progress: Progress | None):
    """Yield (start, stacked params) for the children in chunks of ``config["batch_models"]``."""
    n = weights.shape[0]
    steps, lrs = _ranges(n, derive_seed(seed, "ranges"), config["ft_steps"], config["ft_lr"])
    chunk = config["batch_models"]
    for start in resolve(progress)(range(0, n, chunk), total=-(-n // chunk), desc="fine-tune"):
        end = min(n, start + chunk)
        # ``root`` is one model (1, ...) shared by all children, or one start point per child (n, ...).
        stacked = {k: v.expand(end - start, *v.shape[1:]) if v.shape[0] == 1 else v[start:end] for k, v in root.items()}
        ins = inputs if inputs.shape[0] == 1 else inputs[start:end]
        yield start, train_stacked(stacked, ins, y, weights[start:end], lrs[start:end], steps[start:end], 128,
                                   derive_seed(seed, "batch", start))


def make_class_subset_zoo(folder: str | Path, children: tuple[int, ...] = (1000, 300, 300), hidden: int = 128,
                          subset_size: int = 5, ft_steps=(40, 100), ft_lr=(5e-4, 2e-3), batch_models: int = 200,
                          intermediates: int = 0, seed: int = 0, progress: Progress | None = None) -> Manifest:
    """Trees of fine-tunes on random class subsets (Task A). Tree k has a root seeded from (seed, k) and
    ``children[k]`` children. ``intermediates > 0`` first fine-tunes that many all-class models from the root
    (150-300 steps, lr 1e-3-3e-3: the nuisance of a deeper tree) and hangs the children below them in turn.
    Cached: an existing manifest with the same config is returned as is."""
    if not 1 <= subset_size <= 10:  # digits has 10 classes; numpy's own error would not name the argument
        raise ConfigError(f"subset_size must be 1..10 (digits has 10 classes), got {subset_size}")
    folder = Path(folder)
    config = {"family": "class_subset_star", "children": list(children), "hidden": hidden, "subset_size": subset_size,
              "ft_steps": list(ft_steps), "ft_lr": list(ft_lr), "batch_models": batch_models, "seed": seed}
    if intermediates:
        config["intermediates"] = intermediates
    if (cached := _cached(folder, config)) is not None:
        return cached
    x, y = _digits()
    flat = x.reshape(1, x.shape[0], -1)  # (1, N, 64)
    records: list[ModelRecord] = []
    for k, n_children in enumerate(children):
        tree = f"t{k}"
        root = _train_root(x, y, hidden, derive_seed(seed, "root", k))
        records.append(ModelRecord(tree, _save_model(folder, tree, _unstack(root, 0)), None, tree, "mlp", "digits",
                                   "root", task={"kind": "class_subset", "classes": list(range(10))}))
        parents, root = _intermediates(folder, tree, root, intermediates, n_children, flat, y, records,
                                       derive_seed(seed, "mid", k))
        rng = np.random.default_rng(derive_seed(seed, "subsets", k))
        subsets = [sorted(rng.choice(10, subset_size, replace=False).tolist()) for _ in range(n_children)]
        weights = torch.stack([torch.isin(y, torch.tensor(s)).float() for s in subsets])  # (n, N)
        for start, params in _fine_tune_batches(root, flat, y, weights, config, derive_seed(seed, "ft", k), progress):
            for i in range(params["embed.weight"].shape[0]):
                name = f"{tree}-c{start + i:04d}"
                task = {"kind": "class_subset", "dataset": "digits", "classes": subsets[start + i],
                        "label": "digits classes " + ",".join(map(str, subsets[start + i]))}
                records.append(ModelRecord(name, _save_model(folder, name, _unstack(params, i)), parents[start + i],
                                           tree, "mlp", "digits", "full", task=task))
    manifest = _manifest(records, config, folder)
    manifest.save(folder / "manifest.json")
    return manifest


def _intermediates(folder, tree, root, count, n_children, flat, y, records, seed):
    """(parent name per child, start weights): the root itself, or ``count`` all-class fine-tunes of it."""
    if not count:
        return [tree] * n_children, root
    stacked = {k: v.expand(count, *v.shape[1:]) for k, v in root.items()}
    steps, lrs = _ranges(count, seed, (150, 300), (1e-3, 3e-3))
    mids = train_stacked(stacked, flat, y, torch.ones(count, len(y)), lrs, steps, 128, derive_seed(seed, "train"))
    for j in range(count):
        name = f"{tree}-m{j:02d}"
        records.append(ModelRecord(name, _save_model(folder, name, _unstack(mids, j)), tree, tree, "mlp", "digits",
                                   "full", task={"kind": "all_classes", "label": "digits, all classes"}))
    pick = torch.arange(n_children) % count  # child i hangs below intermediate i mod count
    return [f"{tree}-m{j:02d}" for j in pick.tolist()], {k: v[pick] for k, v in mids.items()}


def named_classes() -> list[tuple[int, str]]:
    """Every (digit, transform) class of the named-class family, in a fixed order."""
    return [(d, t) for t in TRANSFORMS for d in range(10)]


def make_named_class_zoo(folder: str | Path, models_per_class: int = 10, hidden: int = 128, focus: float = 8.0,
                         ft_steps=(60, 120), ft_lr=(1e-3, 3e-3), batch_models: int = 200, seed: int = 0,
                         progress: Progress | None = None) -> Manifest:
    """One root and ``models_per_class`` fine-tunes per named class (Task B); ``task["label"]`` is the prompt."""
    folder = Path(folder)
    config = {"family": "named_class_star", "models_per_class": models_per_class, "hidden": hidden, "focus": focus,
              "ft_steps": list(ft_steps), "ft_lr": list(ft_lr), "batch_models": batch_models, "seed": seed}
    if (cached := _cached(folder, config)) is not None:
        return cached
    x, y = _digits()
    root = _train_root(x, y, hidden, derive_seed(seed, "root"))
    records = [ModelRecord("root", _save_model(folder, "root", _unstack(root, 0)), None, "root", "mlp", "digits",
                           "root", task={"kind": "named_class", "label": "handwritten digits"})]
    classes = [c for c in named_classes() for _ in range(models_per_class)]
    inputs = torch.stack([TRANSFORMS[t][1](x).reshape(x.shape[0], -1) for _, t in classes])  # (n, N, 64)
    weights = torch.stack([1.0 + (focus - 1.0) * (y == d).float() for d, _ in classes])  # (n, N)
    for start, params in _fine_tune_batches(root, inputs, y, weights, config, derive_seed(seed, "ft"), progress):
        for i in range(params["embed.weight"].shape[0]):
            d, t = classes[start + i]
            name = f"n{start + i:04d}"
            task = {"kind": "named_class", "digit": d, "transform": t, "label": prompt(d, t),
                    "class_index": named_classes().index((d, t))}
            records.append(ModelRecord(name, _save_model(folder, name, _unstack(params, i)), "root", "root", "mlp",
                                       "digits", "full", task=task))
    manifest = _manifest(records, config, folder)
    manifest.save(folder / "manifest.json")
    return manifest


def apply_transform(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, 1, H, W) under a :data:`TRANSFORMS` name, or several joined by "+" (applied left to right)."""
    for part in name.split("+"):
        if part not in TRANSFORMS:
            raise ConfigError(f"unknown transform {part!r} in {name!r}; known: {', '.join(TRANSFORMS)}")
        x = TRANSFORMS[part][1](x)
    return x


def mnist_fashion20(per_source: int = 2000, pool: int = 2, seed: int = 0,
                    transforms: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """A 20-class image set: ``per_source`` MNIST digits (classes 0-9) + ``per_source`` Fashion-MNIST items
    (classes 10-19), both 28x28 average-pooled by ``pool`` (14x14 by default). With ``transforms`` (T names,
    see :func:`apply_transform`) every image appears once per transform and (class c, transform k) is class
    c + 20 k: a 20 T-class label space. Returns x (N, 1, H, W) in [0, 1] and y (N,). The same seed gives the
    same images."""
    from modelatlas.data.registry import load_dataset

    rng = np.random.default_rng(derive_seed(seed, "mnist-fashion20"))
    xs, ys = [], []
    for offset, name in ((0, "mnist5k"), (10, "fashion-mnist")):
        ds = load_dataset(name, "train")
        idx = torch.as_tensor(np.sort(rng.choice(len(ds.y), min(per_source, len(ds.y)), replace=False)))
        xs.append(F.avg_pool2d(ds.x[idx].float(), pool) if pool > 1 else ds.x[idx].float())
        ys.append(ds.y[idx].long() + offset)
    x, y = torch.cat(xs), torch.cat(ys)
    if not transforms:
        return x, y
    return (torch.cat([apply_transform(t, x) for t in transforms]),  # (T N, 1, H, W)
            torch.cat([y + 20 * k for k in range(len(transforms))]))


def make_wide_subset_zoo(folder: str | Path, children: int = 500, hidden: int = 256, subset_size: int = 10,
                         per_source: int = 2000, root_steps: int = 1500, root_lr: float = 1e-3,
                         ft_steps=(30, 60), ft_lr=(1e-4, 3e-4), batch: int = 128, batch_models: int = 50,
                         seed: int = 0, transforms: tuple[str, ...] = (), progress: Progress | None = None) -> Manifest:
    """One tree closer to the ProbeX paper's regime (Task A): a 20-class label space (MNIST + Fashion-MNIST,
    :func:`mnist_fashion20`), a wide MLP ``D-hidden-hidden-hidden-20`` root trained well on every class, then
    ``children`` brief, small-lr fine-tunes (weights move little), each on a random ``subset_size`` of the 20
    classes. ``transforms`` (e.g. 5 names: a 100-class space, as the paper's CIFAR-100) multiplies the label
    space (:func:`mnist_fashion20`). Same layer names as :data:`LAYERS`; the square ``layers.0`` / ``layers.1``
    are (hidden, hidden).
    Time O((root_steps + children * max(ft_steps)) * batch * params). Cached like the other families."""
    folder = Path(folder)
    config = {"family": "wide_subset_star", "children": children, "hidden": hidden, "subset_size": subset_size,
              "per_source": per_source, "root_steps": root_steps, "root_lr": root_lr, "ft_steps": list(ft_steps),
              "ft_lr": list(ft_lr), "batch": batch, "batch_models": batch_models, "seed": seed,
              **({"transforms": list(transforms)} if transforms else {})}  # older caches stay valid
    if (cached := _cached(folder, config)) is not None:
        return cached
    x, y = mnist_fashion20(per_source, seed=0, transforms=tuple(transforms))  # fixed images; the seed varies models
    n_classes = int(y.max()) + 1
    flat = x.reshape(1, x.shape[0], -1)
    sizes = [flat.shape[-1], hidden, hidden, hidden, n_classes]
    root = _init(1, sizes, torch_generator(derive_seed(seed, "root")))
    root = train_stacked(root, flat, y, torch.ones(1, len(y)), torch.tensor([root_lr]), torch.tensor([root_steps]),
                         batch, derive_seed(seed, "root", "train"))
    tree = "t0"
    records = [ModelRecord(tree, _save_model(folder, tree, _unstack(root, 0)), None, tree, "mlp", "mnist-fashion20",
                           "root", task={"kind": "class_subset", "classes": list(range(n_classes)),
                                         "root_train_acc": _accuracy(root, flat, y)})]
    records += _subset_children(folder, tree, root, flat, y, config, progress)
    manifest = _manifest(records, config, folder)
    manifest.save(folder / "manifest.json")
    return manifest


def _subset_children(folder: Path, tree: str, root: dict[str, torch.Tensor], flat: torch.Tensor, y: torch.Tensor,
                     config: dict, progress: Progress | None) -> list[ModelRecord]:
    """The wide zoo's ``children`` fine-tunes of ``root`` (named ``tree``) on random class subsets, trained ``batch_models``
    at a time as one stacked model, saved, and their records."""
    seed, children, batch_models, n_classes = config["seed"], config["children"], config["batch_models"], int(y.max()) + 1
    rng = np.random.default_rng(derive_seed(seed, "subsets"))
    subsets = [sorted(rng.choice(n_classes, config["subset_size"], replace=False).tolist()) for _ in range(children)]
    weights = torch.stack([torch.isin(y, torch.tensor(s)).float() for s in subsets])  # (n, N)
    steps, lrs = _ranges(children, derive_seed(seed, "ranges"), tuple(config["ft_steps"]), tuple(config["ft_lr"]))
    records = []
    for start in resolve(progress)(range(0, children, batch_models), total=-(-children // batch_models),
                                   desc="fine-tune"):
        end = min(children, start + batch_models)
        stacked = {k: v.expand(end - start, *v.shape[1:]) for k, v in root.items()}
        params = train_stacked(stacked, flat, y, weights[start:end], lrs[start:end], steps[start:end],
                               config["batch"], derive_seed(seed, "batch", start))
        for i in range(end - start):
            name, classes = f"{tree}-c{start + i:04d}", subsets[start + i]
            task = {"kind": "class_subset", "dataset": "mnist-fashion20", "classes": classes,
                    "label": "classes " + ",".join(map(str, classes))}
            records.append(ModelRecord(name, _save_model(folder, name, _unstack(params, i)), tree, tree, "mlp",
                                       "mnist-fashion20", "full", task=task))
    return records


def _accuracy(params: dict[str, torch.Tensor], flat: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((forward(params, flat).argmax(-1)[0] == y).float().mean())

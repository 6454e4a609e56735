"""The evaluation protocol of dataset distillation: train fresh networks on S, test on the real test set.

Two protocols (always stated with the numbers, since most failed reproductions are protocol differences):
- ``"sgd"`` (DC/DSA/DM): SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, ``epochs`` epochs over
  S (300 by default, 1000 with DSA), lr x 0.1 at half; DSA on every batch when ``dsa``.
- ``"adam"`` (RaT-BPTT/PoDD): Adam at the inner lr (1e-3 unless S carries a learned lr or ``lr`` is set)
  on random synthetic batches of ``batch_size`` with the same augmentation, ``epochs * ceil(N / batch)``
  steps.
Soft labels (targets (N, K) of probabilities) train with soft cross-entropy. :func:`evaluate_random_baseline`
scores a random real subset of the same size under the same protocol. The returned ``protocol`` dict records
exactly what ran (including the resolved epochs, lr and net).

Cost: ``num_nets`` x (steps x forward/backward on ``batch_size`` + one pass over the test set).
"""

from __future__ import annotations

import importlib
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from modelatlas.config_types import misfit
from modelatlas.data.registry import ArrayDataset
from modelatlas.distill.augment import DSA, DSAParams
from modelatlas.distill.nets import MAX_DEPTH, MAX_WIDTH, NET_NAMES, make_net, pick_device
from modelatlas.distill.synthetic import SyntheticSet, sample_per_class
from modelatlas.errors import ConfigError
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import SEED_RANGE, derive_seed, is_seed, torch_generator

# (augmented batch, its indices into the set, epoch) -> targets (hard (B,) or soft (B, K)).
LabelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# EvalProtocol's counts and numbers (a result.json's protocol is checked for these types)
PROTOCOL_INTS = ("num_nets", "epochs", "batch_size", "width", "depth")
PROTOCOL_FLOATS = ("lr", "momentum", "weight_decay")


@dataclass
class EvalProtocol:
    """How synthetic sets are scored. ``None`` fields take the protocol's default (see module docstring)."""

    kind: str = "sgd"
    num_nets: int = 5
    epochs: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    batch_size: int = 256
    dsa: bool = False
    net: str = "convnet"
    width: int = 128
    depth: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adam"):
            raise ConfigError(f"eval protocol kind must be 'sgd' or 'adam', got {self.kind!r}")
        self._check_kinds()
        if self.num_nets < 1:
            raise ConfigError(f"eval num_nets must be >= 1, got {self.num_nets}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"eval epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"eval batch_size must be >= 1, got {self.batch_size}")
        # `not x > 0` also catches NaN; lr 0 would otherwise be replaced by the default (`self.lr or ...`)
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"eval lr must be > 0 and finite (or None for the protocol default), got {self.lr}")
        if self.weight_decay is not None and not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"eval weight_decay must be >= 0 and finite (or None for the protocol default), "
                              f"got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"eval momentum must be in [0, 1), got {self.momentum}")
        for name in ("width", "depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval {name} must be >= 1, got {getattr(self, name)}")
        if self.width > MAX_WIDTH:  # a hand-edited result.json's width 100000: an allocator traceback
            raise ConfigError(f"eval width must be at most {MAX_WIDTH:,}, got {self.width:,}")
        if self.depth > MAX_DEPTH:
            raise ConfigError(f"eval depth must be at most {MAX_DEPTH}, got {self.depth:,}")

    def _check_kinds(self) -> None:
        """Counts are integers (1.5 nets failed in range(), True ran 1), ``dsa`` a bool, ``net`` a known net."""
        bad = misfit({n: getattr(self, n) for n in (*PROTOCOL_INTS, "dsa")}, EvalProtocol)
        if bad is not None:  # dsa "yes" turned DSA on
            kind = "true or false" if bad.key == "dsa" else "an integer"
            raise ConfigError(f"eval {bad.key} must be {kind}, got {bad.value!r}")
        if self.net not in NET_NAMES:
            raise ConfigError(f"eval net must be one of {', '.join(NET_NAMES)}, got {self.net!r}")
        if type(self.momentum) not in (int, float):  # None (a result.json's null) failed as a TypeError
            raise ConfigError(f"eval momentum must be a number, got {self.momentum!r}")

    def resolved(self, learned_lr: float | None = None) -> EvalProtocol:
        """A copy with every default filled in."""
        epochs = self.epochs or (1000 if self.dsa and self.kind == "sgd" else 300)
        if self.kind == "sgd":
            return replace(self, epochs=epochs, lr=self.lr or 0.01,
                           weight_decay=5e-4 if self.weight_decay is None else self.weight_decay)
        return replace(self, epochs=epochs, lr=self.lr or learned_lr or 1e-3,
                       weight_decay=0.0 if self.weight_decay is None else self.weight_decay)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["description"] = describe(self)
        return d


def _epochs(n: int) -> str:
    return "1 epoch" if n == 1 else f"{n} epochs"


def describe(p: EvalProtocol) -> str:
    """One line stating the protocol (for tables and result.json)."""
    aug = "DSA" if p.dsa else "no augmentation"
    if p.kind == "sgd":
        return (f"{p.num_nets} x {p.net}-{p.depth} w{p.width} from scratch, SGD lr {p.lr} mom {p.momentum} "
                f"wd {p.weight_decay}, batch {p.batch_size}, {_epochs(p.epochs)}, lr x0.1 at half, {aug}")
    return (f"{p.num_nets} x {p.net}-{p.depth} w{p.width} from scratch, Adam lr {p.lr}, random batches of "
            f"{p.batch_size}, {_epochs(p.epochs)}, {aug}")


@dataclass
class EvalResult:
    mean: float
    std: float
    accuracies: list[float]
    protocol: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard (N,) or soft (N, K) targets."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def train_network(net: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, p: EvalProtocol,
                  generator: torch.Generator, dsa: DSA | None = None, label_fn: LabelFn | None = None,
                  crop_seed: int | None = None, progress: Progress | None = None,
                  desc: str = "train") -> torch.nn.Module:
    """Train ``net`` on (x, targets) under resolved protocol ``p``; returns it. O(steps x batch) time.
    ``progress``: a bar over the epochs, labelled ``desc``.

    ``label_fn(x_batch_augmented, idx, epoch) -> targets`` replaces ``targets[idx]`` (labels generated on the
    fly, e.g. HeLlO's projector, or a lookup in stored per-crop labels; ``idx`` is on the CPU, the targets may
    be on any device). ``crop_seed``: the DSA draw of image
    i in epoch e depends only on (crop_seed, e, i), identical for every network (stored per-crop labels)."""
    opt = (torch.optim.SGD(net.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
           if p.kind == "sgd" else torch.optim.Adam(net.parameters(), lr=p.lr, weight_decay=p.weight_decay))
    n, per_epoch = len(x), math.ceil(len(x) / p.batch_size)
    net.train()
    for epoch in resolve(progress)(range(p.epochs), total=p.epochs, desc=desc):
        if p.kind == "sgd" and epoch == p.epochs // 2 and p.epochs > 1:
            for g in opt.param_groups:
                g["lr"] = p.lr * 0.1
        order = torch.randperm(n, generator=generator)
        crops = None if crop_seed is None or dsa is None else \
            dsa.sample(torch_generator(derive_seed(crop_seed, "crop", epoch)), batch=n)
        for b in range(per_epoch):
            idx = (order[b * p.batch_size:(b + 1) * p.batch_size] if p.kind == "sgd"
                   else torch.randint(n, (min(p.batch_size, n),), generator=generator))
            xb, tb = x[idx.to(x.device)], targets[idx.to(x.device)]
            if crops is not None:
                xb = DSAParams(dsa, {k: v[idx] for k, v in crops.values.items()}).apply(xb)
            elif dsa is not None:
                xb = dsa.sample(generator, batch=len(xb)).apply(xb)
            if label_fn is not None:  # a lookup in labels kept on the CPU is fine: they go to the batch's device
                tb = label_fn(xb, idx, epoch).to(xb.device)
            loss = soft_cross_entropy(net(xb), tb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net


@torch.no_grad()
def accuracy(net: torch.nn.Module, test: ArrayDataset, device: torch.device, batch: int = 1024) -> float:
    """Top-1 accuracy (%) on a dataset. O(N) forward passes."""
    net.eval()
    correct = 0
    for i in range(0, len(test), batch):
        xb, yb = test.x[i:i + batch].to(device), test.y[i:i + batch].to(device)
        correct += int((net(xb).argmax(1) == yb).sum())
    return 100.0 * correct / max(len(test), 1)


def evaluate_tensors(x: torch.Tensor, targets: torch.Tensor, test: ArrayDataset, protocol: EvalProtocol,
                     seed: int = 0, progress: Progress | None = None, device: str | None = None,
                     learned_lr: float | None = None, label_fn: LabelFn | None = None,
                     crop_seed: int | None = None, desc: str = "evaluate") -> EvalResult:
    """Train ``protocol.num_nets`` fresh nets on (x, targets) and test each on ``test`` (``label_fn``,
    ``crop_seed``: see :func:`train_network`; ``desc`` labels the progress bar)."""
    if not is_seed(seed):  # 2**64 trained the nets of seed 0
        raise ConfigError(f"seed must be {SEED_RANGE}, got {seed!r}")
    dev = pick_device(device)
    p = protocol.resolved(learned_lr)
    x, targets = x.detach().to(dev), targets.detach().to(dev)
    dsa = DSA.for_dataset(tuple(x.shape[1:])) if p.dsa else None
    accs = []
    bar = resolve(progress)(range(p.num_nets), total=p.num_nets, desc=desc)
    for i in bar:
        net = make_net(p.net, tuple(x.shape[1:]), test.num_classes, p.width, p.depth,
                       seed=derive_seed(seed, "eval-net", i), device=dev)
        train_network(net, x, targets, p, torch_generator(derive_seed(seed, "eval-batches", i)), dsa, label_fn,
                      crop_seed, progress, f"{desc}: net {i + 1}/{p.num_nets}, epochs")  # a net takes minutes
        accs.append(accuracy(net, test, dev))
        bar.set_postfix(acc=f"{accs[-1]:.1f}")
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return EvalResult(statistics.fmean(accs), std, accs, {**p.to_dict(), "seed": seed, "device": str(dev)})


def evaluate_synthetic(syn: SyntheticSet, test: ArrayDataset, protocol: EvalProtocol, seed: int = 0,
                       progress: Progress | None = None, device: str | None = None) -> EvalResult:
    """Score a :class:`SyntheticSet`. Its soft labels are used when present; its learned lr only under the
    Adam protocol with ``protocol.lr`` unset (SGD keeps its fixed lr: MTT's learned lr is recorded, not used).
    A set whose ``meta["label_generator"]`` names one of ``LABEL_GENERATORS`` (``"<module>:<function>"``) gets
    its labels generated on the fly by ``function(syn, device) -> label_fn``, e.g. HeLlO's projector."""
    lr = float(syn.lr.detach()) if syn.lr is not None else None
    return evaluate_tensors(syn.images, syn.targets().detach(), test, protocol, seed, progress, device, lr,
                            label_fn=label_generator(syn, pick_device(device)))


# The label generators a saved set may name: a synthetic.json is data, so it must not pick any function to call.
LABEL_GENERATORS = ("modelatlas.distill.methods.hello.method:make_label_fn",)


def label_generator(syn: SyntheticSet, device: torch.device) -> LabelFn | None:
    """The on-the-fly label function a set names in ``meta["label_generator"]`` (one of ``LABEL_GENERATORS``)."""
    name = syn.meta.get("label_generator")
    if not name:
        return None
    if name not in LABEL_GENERATORS:
        where = syn.meta.get("source", "synthetic set")
        raise ConfigError(f"{where}: meta label_generator {name!r} is not a known label generator; "
                          f"known: {', '.join(LABEL_GENERATORS)}")
    module, _, func = name.partition(":")
    return getattr(importlib.import_module(module), func)(syn, device)


def evaluate_random_baseline(train: ArrayDataset, test: ArrayDataset, ipc: int, protocol: EvalProtocol,
                             seed: int = 0, progress: Progress | None = None, device: str | None = None) -> EvalResult:
    """The random-real-subset baseline: ``ipc`` random real images per class, scored under ``protocol``."""
    idx = sample_per_class(train.y, train.num_classes, ipc, torch_generator(derive_seed(seed, "random-subset")))
    res = evaluate_tensors(train.x[idx], train.y[idx], test, protocol, seed, progress, device,
                           desc="evaluate: random baseline")  # not a second 'evaluate' bar, as if starting over
    res.protocol["baseline"] = f"random real subset, {ipc} per class"
    return res


def evaluate_full_data(train: ArrayDataset, test: ArrayDataset, protocol: EvalProtocol, seed: int = 0,
                       progress: Progress | None = None, device: str | None = None) -> EvalResult:
    """The full-training-set upper bound under ``protocol``."""
    res = evaluate_tensors(train.x, train.y, test, protocol, seed, progress, device, desc="evaluate: full data")
    res.protocol["baseline"] = "full training set"
    return res

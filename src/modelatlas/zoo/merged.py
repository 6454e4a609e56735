"""Merged models in a zoo (``ZooConfig.merges``): weighted sums of a tree's trained models, as mergekit writes.

Users' folders hold merges beside fine-tunes (model soups, task arithmetic, SLERP), and a merge placed as a
fine-tune draws its parents below itself. A zoo with merges gives lineage recovery's merge detection
(:mod:`modelatlas.lineage.merges`) a ground truth: each merged model's manifest record names its parents and
their weights (``merge``), and its ``parent`` is the most weighted one (the first of equals), the one a
recovered merge is drawn under. Per tree, after every trained model is saved, ``merges`` merges cycle
through three kinds, each on a pair of the tree's fine-tuned models no other merge of the tree takes:

* ``linear``: ``t A + (1 - t) B``, t uniform in 0.2-0.8 (mergekit ``linear``, a two-model soup);
* ``task_arithmetic``: ``P + x (A - P) + y (B - P)`` for siblings A, B of parent P, x and y uniform in
  0.3-1.0 (weights ``1 - x - y, x, y`` on P, A, B); a ``linear`` merge where no sibling pair is left;
* ``slerp``: per tensor, spherical interpolation of A and B as flat vectors at t uniform in 0.2-0.8 (weights
  ``1 - t, t``; mergekit's ``slerp``, which falls back to a linear merge of nearly parallel tensors).

``ZooConfig.merge_kinds`` may add mergekit's sparse kinds, on two siblings A, B with their parent P as the base
(else on two fine-tunes with their nearest common ancestor as the base, neither above the other where such a
pair is left), weights x,
y uniform in 0.3-1.0 and a density d uniform in 0.3-0.7, per tensor on the task vectors tau = X - P:

* ``ties``: each tau trimmed to its top ``int(d n)`` magnitudes (at least one), the sign of ``x tau_A + y
  tau_B`` elected per value (>= 0: +), and the agreeing values' weighted mean (mergekit normalizes: a value
  only one model keeps is that model's own) added to P;
* ``dare_linear``: each tau's values dropped with probability 1 - d, the rest rescaled by 1/d, P + x tau_A +
  y tau_B (mergekit does not normalize DARE); ``dare_ties``: those, summed over the sign-agreeing values.

Their record holds ``parents`` [P, A, B], ``weights`` [0, x, y] (the base is the origin, weighted by none),
``density`` and, for DARE, the ``seed`` of its drops (drawn from the tree's seed); mergekit's lambda is 1.
A merge's true parents are all three (a declared mergekit merge names its base too).

Float tensors are merged in float64 and stored in ``ZooConfig.merge_dtype``; other tensors are the main
parent's. Planning draws from a seed derived from the zoo's seed and the tree. Time O(merges x parents x P)
per tree, memory O(parents x P) for P weights.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from modelatlas.seeding import derive_seed
from modelatlas.zoo.config import SPARSE_MERGE_KINDS as SPARSE
from modelatlas.zoo.config import WEIGHTED_MERGE_KINDS, ZooConfig

KINDS = WEIGHTED_MERGE_KINDS  # the default ZooConfig.merge_kinds
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_TRIES = 1000  # sibling pairs drawn before a large tree's task arithmetic takes any pair
LISTED = 2000  # fine-tuned models of a tree up to which every pair is listed (2M pairs); beyond, pairs are drawn
_PARALLEL = 0.9995  # mergekit's threshold: |cos| above it, SLERP is a linear merge


def merge_names(config: ZooConfig) -> list[str]:
    """The merged models' names, tree by tree: ``t0.merge0``, ``t0.merge1``, ... O(trees x merges)."""
    return [f"t{t}.merge{i}" for t in range(config.trees) for i in range(config.merges)]


def plan_merges(config: ZooConfig, nodes: list[dict]) -> list[dict]:
    """The merge nodes of the planned zoo ``nodes`` (trained models, parents first), one level below the
    deepest: ``name, parent (the main parent), tree, level, method "merge", storage "full", task ({"dataset"}),
    eval_task (the main parent's task, for its test accuracy), merge ({"kind", "parents", "weights"}),
    train ({})``. O(trees x (models^2 + merges x models^2)): a merge takes its pair out of the tree's lists."""
    level = 1 + max(n["level"] for n in nodes)
    by_name = {n["name"]: n for n in nodes}
    out = []
    for t in range(config.trees):
        tree = f"t{t}"
        rng = np.random.default_rng(derive_seed(config.seed, tree, "merges"))
        tuned = [n["name"] for n in nodes if n["tree"] == tree and n["parent"] is not None]
        used: set[frozenset] = set()
        pick = (partial(_PairLists(tuned, by_name).draw, rng=rng) if len(tuned) <= LISTED
                else partial(_sampled, tuned=tuned, by_name=by_name, used=used, rng=rng))
        for i in range(config.merges):
            merge = _draw(config.merge_kinds[i % len(config.merge_kinds)], pick, by_name, used, rng)
            main = by_name[merge["parents"][int(np.argmax(merge["weights"]))]]  # first of equals
            out.append({"name": f"{tree}.merge{i}", "parent": main["name"], "tree": tree, "level": level,
                        "method": "merge", "storage": "full", "task": {"dataset": main["task"]["dataset"]},
                        "eval_task": main["task"], "merge": merge, "train": {}})
    return out


def _draw(kind: str, pick: Callable, by_name: dict, used: set, rng: np.random.Generator) -> dict:
    """One merge of ``kind`` on the pair ``pick(kind)`` gives (with the kind it leaves: task arithmetic without
    siblings is linear), which joins ``used``: siblings for task arithmetic, any two fine-tuned models otherwise
    (TIES / DARE: siblings, else two not one above the other)."""
    kind, (a, b) = pick(kind)
    used.add(frozenset((a, b)))
    if kind == "task_arithmetic":
        x, y = rng.uniform(0.3, 1.0, 2).tolist()
        return {"kind": kind, "parents": [by_name[a]["parent"], a, b], "weights": [1 - x - y, x, y]}
    if kind in SPARSE:
        x, y = rng.uniform(0.3, 1.0, 2).tolist()
        base = _common_base(a, b, by_name)
        base = by_name[base]["parent"] if base in (a, b) else base  # a and b nested: the upper one's parent
        rec = {"kind": kind, "parents": [base, a, b], "weights": [0.0, x, y],
               "density": float(rng.uniform(0.3, 0.7))}
        return {**rec, "seed": int(rng.integers(2**31))} if kind != "ties" else rec
    t = float(rng.uniform(0.2, 0.8))
    return {"kind": kind, "parents": [a, b], "weights": [1 - t, t]}


class _PairLists:
    """A tree's pairs of fine-tunes, its sibling pairs and (the sparse kinds') pairs neither above the other, in
    ``itertools.combinations`` order, built once: a pair leaves them when a merge takes it (listing them again
    each merge cost a 2,000-model tree ~0.4-1 s a merge). O(len(tuned)^2) memory."""

    def __init__(self, tuned: list[str], by_name: dict):
        self.by_name, self.pairs = by_name, list(itertools.combinations(tuned, 2))
        self.siblings = [p for p in self.pairs if by_name[p[0]]["parent"] == by_name[p[1]]["parent"]]
        self.apart: list[tuple] | None = None  # built when first needed, from the pairs left

    def draw(self, kind: str, rng: np.random.Generator) -> tuple[str, tuple]:
        """(kind, a pair not taken): siblings for task arithmetic (a linear merge when none is left) and the
        sparse kinds (else two apart, else any)."""
        pool = self.pairs
        if kind == "task_arithmetic" or kind in SPARSE:
            kind = "linear" if kind == "task_arithmetic" and not self.siblings else kind
            if kind in SPARSE and not self.siblings and self.apart is None:
                self.apart = [p for p in self.pairs if _common_base(*p, self.by_name) not in p]
            pool = self.siblings or (self.apart if kind in SPARSE else None) or self.pairs
        pair = pool[int(rng.integers(len(pool)))]  # ZooConfig checked that enough pairs exist
        for taken in (self.pairs, self.siblings, self.apart or []):
            if pair in taken:
                taken.remove(pair)
        return kind, pair


def _sampled(kind: str, tuned: list[str], by_name: dict, used: set, rng: np.random.Generator) -> tuple[str, tuple]:
    """(kind, a pair) of a tree too large to list its pairs (a star of 100,000 has 5e9): siblings drawn as a
    family (weighted by its pairs) and two of its members, other pairs two models at random, until one is not in
    ``used`` (``used`` holds at most the tree's merges, a small share of its pairs). O(tries x depth^2)."""
    families: dict[str, list[str]] = {}
    for name in tuned:
        families.setdefault(by_name[name]["parent"], []).append(name)
    groups = [g for g in families.values() if len(g) >= 2]
    if kind in ("task_arithmetic", *SPARSE) and groups:
        odds = np.array([len(g) * (len(g) - 1) for g in groups], dtype=np.float64)
        for _ in range(_TRIES):  # (the families' pairs may all be taken: then as for other kinds)
            group = groups[int(rng.choice(len(groups), p=odds / odds.sum()))]
            pair = tuple(sorted(rng.choice(group, 2, replace=False).tolist(), key=tuned.index))
            if frozenset(pair) not in used:
                return kind, pair
    kind = "linear" if kind == "task_arithmetic" else kind
    while True:
        i, j = sorted(rng.choice(len(tuned), 2, replace=False).tolist())
        pair = (tuned[i], tuned[j])
        if frozenset(pair) not in used and (kind not in SPARSE or _common_base(*pair, by_name) not in pair):
            return kind, pair


def _common_base(a: str, b: str, by_name: dict) -> str:
    """The nearest common ancestor of ``a`` and ``b`` (their parent when siblings; ``a`` when it is ``b``'s).
    O(depth^2)."""
    up = [a]
    while by_name[up[-1]]["parent"] is not None:
        up.append(by_name[up[-1]]["parent"])
    node = b
    while node not in up:
        node = by_name[node]["parent"]
    return node


def merged_state(merge: dict, states: list[dict[str, torch.Tensor]], dtype: str = "float32") -> dict[str, torch.Tensor]:
    """The merge ``merge`` (kind, weights) of the parents' state dicts ``states`` (in ``merge["parents"]``'s
    order): float tensors merged in float64 and cast to ``dtype``; others copied from the most weighted
    parent. O(parents x P)."""
    from modelatlas.zoo.sparse_merged import sparse_merge

    weights = merge["weights"]
    main = states[int(np.argmax(weights))]
    gen = torch.Generator().manual_seed(merge.get("seed", 0))  # DARE's drops, tensor after tensor
    out = {}
    for key, value in main.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        ts = [s[key].double() for s in states]
        if merge["kind"] == "slerp":
            merged = slerp(weights[1], ts[0], ts[1])
        elif merge["kind"] in SPARSE:
            merged = sparse_merge(merge, ts[0], ts[1:], gen)
        else:
            merged = sum(w * x for w, x in zip(weights, ts))
        out[key] = merged.to(_DTYPES[dtype]).contiguous()
    return out


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1) of two tensors as flat vectors, the
    angle taken between their directions and the result a combination of the tensors themselves (mergekit's
    ``slerp``); a linear merge when they are nearly parallel or one is zero. O(size)."""
    fa, fb = a.flatten(), b.flatten()  # (P,)
    na, nb = fa.norm(), fb.norm()
    cos = (fa @ fb / (na * nb)).clamp(-1, 1) if na > 0 and nb > 0 else torch.tensor(1.0, dtype=fa.dtype)
    if cos.abs() > _PARALLEL:
        return (1 - t) * a + t * b
    theta = torch.arccos(cos)
    return ((torch.sin((1 - t) * theta) * fa + torch.sin(t * theta) * fb) / torch.sin(theta)).view(a.shape)


def build_merge(job: dict) -> dict:
    """Write one planned merge (``job["node"]``) from its parents' saved weights and return its manifest
    record (its ``train`` holds the main parent's task's test accuracy)."""
    from modelatlas.zoo.architectures import build_model
    from modelatlas.zoo.store import clear_folder, load_state, save_full, weights_digest, write_record
    from modelatlas.zoo.tasks import task_data
    from modelatlas.zoo.train import accuracy

    start = time.perf_counter()
    node, arch, out = job["node"], job["arch"], Path(job["out"])
    state = merged_state(node["merge"], [load_state(out, p) for p in node["merge"]["parents"]], job["merge_dtype"])
    model = build_model(arch)
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    xt, yt = task_data(node["eval_task"], "test", arch["input_shape"], limit=job["eval_samples"])
    folder = out / node["name"]
    folder.mkdir(parents=True, exist_ok=True)
    clear_folder(folder)
    save_full(folder, state, arch)
    train = {"test_acc": accuracy(model, xt, yt), "n_test": len(yt), "dtype": job["merge_dtype"],
             "seconds": round(time.perf_counter() - start, 3)}
    record = {"name": node["name"], "path": node["name"], "parent": node["parent"], "tree": node["tree"],
              "arch": arch["arch"], "dataset": node["task"]["dataset"], "method": "merge", "storage": "full",
              "task": node["task"], "train": train, "sha256": weights_digest(folder / "model.safetensors"),
              "merge": node["merge"]}
    write_record(folder, record, job["fingerprint"])
    return record

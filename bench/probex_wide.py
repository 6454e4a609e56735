"""ProbeX Task A in a regime closer to the paper's: a 20-class label space (MNIST + Fashion-MNIST at 14x14),
a wide MLP (196-256-256-256-20) root trained well, then brief small-lr fine-tunes on random 10-of-20 class
subsets (:func:`modelatlas.probex.families.make_wide_subset_zoo`).

    python bench/probex_wide.py --zoo /tmp/probex_wide [--children 500] [--dev-seed 0] [--test-seed 1]

Protocol (no tuning on evaluation data): hyperparameters (ProbeX rank, dense weight decay) are chosen on a
validation split of the dev zoo's training models; the final numbers are on a zoo built with a held-out seed
(a different root and different children), never seen during selection. Prints a markdown section.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from modelatlas.allocator import keep_freed_memory
from modelatlas.probex import ProbeXConfig
from modelatlas.probex.families import LAYERS, make_wide_subset_zoo

_spec = importlib.util.spec_from_file_location("probex_bench", Path(__file__).with_name("probex.py"))
pb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pb)

LAYER = "layers.1.weight"  # the square hidden layer the dense-vs-ProbeX claim is about (fixed in advance)


def load(zoo: Path, seed: int, children: int, hidden: int, names: list[str], ft: dict | None = None
         ) -> tuple[dict, float, float]:
    (manifest, build) = pb.timed(lambda: make_wide_subset_zoo(zoo / f"seed{seed}", children=children, hidden=hidden,
                                                              seed=seed, **(ft or {})))
    trees, read = pb.timed(lambda: pb.trees_of(manifest, seed, names))
    from safetensors.torch import load_file

    root = load_file(str(manifest.root / manifest.models[0].path))[LAYER]
    d = trees["t0"]
    d["moved"] = float(((d["layers"][LAYER] - root).flatten(1).norm(dim=1) / root.norm()).median())
    return d, build, read, manifest.models[0].task.get("root_train_acc", float("nan"))


STATNN_ALL = "StatNN (9 stats x 8 tensors, boosting)"
STATNN_ONE = f"StatNN, probed layer only (9 stats of {LAYER}, boosting)"


def fit(kind, cfg, d, train_idx, test_idx, layer=LAYER):
    """``kind``: probex, dense, statnn (every tensor, the issue's baseline) or statnn1 (the probed layer only,
    the same input ProbeX and the dense expert get)."""
    stats = [layer] if kind == "statnn1" else list(d["layers"])
    return pb.fit_eval("statnn" if kind == "statnn1" else kind, cfg, layer, [(d["layers"], d["y"], train_idx)],
                       (d["layers"], d["y"], test_idx), stats=stats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default="/tmp/probex_wide")
    p.add_argument("--children", type=int, default=500)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--ranks", default="32,64", help="ProbeX ranks to choose from on validation: R (r_U = r_V = r_T = R) "
                   "or U/V/T (e.g. 128/16/16: many probes, narrow encoders)")
    p.add_argument("--min-fewer", type=float, default=None, metavar="X",
                   help="select ProbeX only among candidates with at least X times fewer parameters than the dense "
                        "expert (the claim's budget, e.g. 20); the others are still reported")
    p.add_argument("--dense-wd", default="1e-5,1e-3,1e-1", help="dense weight decays to choose from on validation")
    p.add_argument("--dev-seed", type=int, default=0)
    p.add_argument("--test-seed", type=int, default=1)
    p.add_argument("--fixed", type=float, default=None, metavar="WD",
                   help="no selection: evaluate ProbeX at every --ranks and dense at this weight decay on the "
                        "--test-seed zoo only (hyperparameters chosen beforehand on another zoo)")
    p.add_argument("--curve", action="store_true", help="with --fixed: also train on growing numbers of models")
    p.add_argument("--ft-steps", default="30,60", help="fine-tuning steps per child: min,max (Adam)")
    p.add_argument("--ft-lr", default="1e-4,3e-4", help="fine-tuning learning rate per child: min,max (log-uniform)")
    p.add_argument("--transforms", default="", help="comma-separated input transforms, each a copy of the 20 "
                   "classes (e.g. identity,invert,rot90,vflip,invert+rot90: 100 classes)")
    p.add_argument("--subset-size", type=int, default=10, help="classes each child is fine-tuned on")
    p.add_argument("--root-steps", type=int, default=1500)
    args = p.parse_args(argv)
    args.ft = {"ft_steps": tuple(map(int, args.ft_steps.split(","))), "ft_lr": tuple(map(float, args.ft_lr.split(",")))}
    if args.transforms or args.subset_size != 10 or args.root_steps != 1500:  # only then: older caches stay valid
        args.ft |= {"transforms": tuple(t for t in args.transforms.split(",") if t), "subset_size": args.subset_size,
                    "root_steps": args.root_steps}
    keep_freed_memory()  # large blocks stay mapped between steps (modelatlas.allocator)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pb.warm_up()  # one-off import costs are not charged to the first timed row
    zoo = Path(args.zoo)
    names = [f"{n}.{k}" for n in LAYERS for k in ("weight", "bias")]
    out = [f"Command: `python bench/probex_wide.py --zoo {args.zoo} --children {args.children} --hidden {args.hidden} "
           f"--epochs {args.epochs} --ranks {args.ranks} --dense-wd {args.dense_wd} --dev-seed {args.dev_seed} "
           + (f"--min-fewer {args.min_fewer:g} " if args.min_fewer is not None else "") +
           f"--test-seed {args.test_seed} --ft-steps {args.ft_steps} --ft-lr {args.ft_lr}"
           + (f" --transforms {args.transforms} --subset-size {args.subset_size} --root-steps {args.root_steps}"
              if "transforms" in args.ft else "") + (" --curve" if args.curve else "")
           + f"` (1 thread, {time.strftime('%Y-%m-%d')}).", ""]
    if args.fixed is not None:
        return fixed(args, zoo, names, out, t0)
    dev, b0, r0, acc0 = load(zoo, args.dev_seed, args.children, args.hidden, names, args.ft)
    shape = tuple(dev["layers"][LAYER].shape[1:])
    base = ProbeXConfig(epochs=args.epochs, seed=0)
    # -- selection on the dev zoo's validation split -------------------------------------------------------
    tr, val = pb.split(len(dev["train"]), 1)
    tr, val = dev["train"][tr], dev["train"][val]
    sel = [f"### Selection on validation (dev zoo seed {args.dev_seed}, {len(tr)} train / {len(val)} validation "
           f"models, layer {LAYER} {shape})", "",
           "| candidate | val per-label acc | val exact-set acc | parameters |", "|---|---|---|---|"]
    probex_scores, dense_scores, sizes = {}, {}, {}
    for wd in map(float, args.dense_wd.split(",")):
        cfg = ProbeXConfig(**{**base.to_dict(), "weight_decay": wd})
        (acc, ex), n_dense, _ = fit("dense", cfg, dev, tr, val)
        dense_scores[wd] = acc
        sel.append(f"| dense, weight decay {wd:g} | {acc:.3f} | {ex:.3f} | {n_dense:,} |")
        print(sel[-1], flush=True)
    for r in args.ranks.split(","):
        (acc, ex), sizes[r], _ = fit("probex", rank_config(base, r), dev, tr, val)
        probex_scores[r] = acc
        sel.append(f"| ProbeX r={r} | {acc:.3f} | {ex:.3f} | {sizes[r]:,} ({n_dense / sizes[r]:.1f}x fewer) |")
        print(sel[-1], flush=True)
    ok = [r for r in probex_scores if args.min_fewer is None or n_dense / sizes[r] >= args.min_fewer]
    if not ok:
        raise SystemExit(f"no --ranks candidate has {args.min_fewer}x fewer parameters than the dense expert")
    r = max(ok, key=probex_scores.get)
    wd = max(dense_scores, key=dense_scores.get)
    budget = "" if args.min_fewer is None else f" (among candidates with >= {args.min_fewer:g}x fewer parameters)"
    out += sel + ["", f"Chosen: ProbeX r = {r}{budget}; dense weight decay {wd:g}.", ""]
    # The held-out zoo is built / read only after the selection is final.
    test, b1, r1, acc1 = load(zoo, args.test_seed, args.children, args.hidden, names, args.ft)
    out[2:2] = [f"Zoo build (root + {args.children} fine-tunes, 1 thread): seed {args.dev_seed} {b0:.0f} s, seed "
                f"{args.test_seed} {b1:.0f} s (0 s when cached); reading every tensor {r0:.1f} s / {r1:.1f} s. Root "
                f"train accuracy: {acc0:.3f} / {acc1:.3f}. Median relative change of {LAYER} by fine-tuning, "
                f"||W_child - W_root|| / ||W_root||: {dev['moved']:.3f} / {test['moved']:.3f}.", ""]
    cfgs = {"probex": rank_config(base, r),
            "dense": ProbeXConfig(**{**base.to_dict(), "weight_decay": wd}), "statnn": base, "statnn1": base}
    labels = {"probex": f"ProbeX (r={r})", "dense": f"dense linear expert (wd {wd:g})", "statnn": STATNN_ALL,
              "statnn1": STATNN_ONE}
    # -- final numbers: dev zoo's test split, then the held-out seed -------------------------------------------
    for title, d in ((f"dev zoo seed {args.dev_seed} (its 20% test models)", dev),
                     (f"held-out zoo seed {args.test_seed} (final)", test)):
        out += [f"### Task A, {title}: {len(d['train'])} train / {len(d['test'])} test models, layer {LAYER} {shape}",
                "", "| method | per-label acc | exact-set acc | parameters | train time (s) |", "|---|---|---|---|---|"]
        for kind in ("probex", "dense", "statnn", "statnn1"):
            (acc, ex), n_par, sec = fit(kind, cfgs[kind], d, d["train"], d["test"])
            out.append(f"| {labels[kind]} | {acc:.3f} | {ex:.3f} | {f'{n_par:,}' if n_par else '-'} | {sec:.1f} |")
            print(out[-1], flush=True)
        out += ["", f"chance: per-label 0.5, exact set {_chance(d):.1e}", ""]
    sizes = [n for n in (50, 100, 200) if n < len(test["train"])] + [len(test["train"])]
    out += [f"### Held-out zoo seed {args.test_seed}: training models vs per-label test accuracy ({LAYER})", "",
            "| train models | " + " | ".join(map(str, sizes)) + " |", "|---|" + "---|" * len(sizes)]
    for kind in ("probex", "dense"):
        accs = [fit(kind, cfgs[kind], test, test["train"][:n], test["test"])[0][0] for n in sizes]
        out.append(f"| {labels[kind]} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
        print(out[-1], flush=True)
    out += ["", f"Total benchmark time: {time.perf_counter() - t0:.0f} s.", ""]
    print("\n".join(out))
    return 0


def rank_config(base: ProbeXConfig, spec: str) -> ProbeXConfig:
    """``"R"`` -> r_U = r_V = r_T = R; ``"U/V/T"`` -> each given."""
    parts = [int(x) for x in spec.split("/")]
    if len(parts) not in (1, 3):
        raise SystemExit(f"--ranks entry {spec!r}: expected R or U/V/T")
    u, v, t = parts * 3 if len(parts) == 1 else parts
    return ProbeXConfig(**{**base.to_dict(), "rank_u": u, "rank_v": v, "rank_t": t})


def _chance(d: dict) -> float:
    """1 / C(labels, subset size): the chance of guessing a child's exact class set."""
    import math

    y = d["y"]
    return 1 / math.comb(y.shape[1], int(y[0].sum()))


def fixed(args, zoo: Path, names: list[str], out: list[str], t0: float) -> int:
    """Evaluate preset hyperparameters on one zoo (no selection, no sweep)."""
    out[0] = out[0].replace(f" --dev-seed {args.dev_seed}", "").replace("--dense-wd " + args.dense_wd,
                                                                       f"--fixed {args.fixed:g}")
    test, b1, r1, acc1 = load(zoo, args.test_seed, args.children, args.hidden, names, args.ft)
    shape = tuple(test["layers"][LAYER].shape[1:])
    out += [f"Zoo build (root + {args.children} fine-tunes, 1 thread): {b1:.0f} s (0 s when cached); reading "
            f"{r1:.1f} s. Root train accuracy: {acc1:.3f}. Median relative change of {LAYER}: "
            f"{test['moved']:.3f}.", "",
            f"### Task A, zoo seed {args.test_seed}: {len(test['train'])} train / {len(test['test'])} test models, "
            f"layer {LAYER} {shape}", "",
            "| method | per-label acc | exact-set acc | parameters | train time (s) |", "|---|---|---|---|---|"]
    base = ProbeXConfig(epochs=args.epochs, seed=0)
    runs = [(f"ProbeX (r={r})", "probex", rank_config(base, r)) for r in args.ranks.split(",")]
    runs += [(f"dense linear expert (wd {args.fixed:g})", "dense",
              ProbeXConfig(**{**base.to_dict(), "weight_decay": args.fixed})),
             (STATNN_ALL, "statnn", base), (STATNN_ONE, "statnn1", base)]
    for label, kind, cfg in runs:
        (acc, ex), n_par, sec = fit(kind, cfg, test, test["train"], test["test"])
        out.append(f"| {label} | {acc:.3f} | {ex:.3f} | {f'{n_par:,}' if n_par else '-'} | {sec:.1f} |")
        print(out[-1], flush=True)
    out += ["", f"chance: per-label 0.5, exact set {_chance(test):.1e}; {test['y'].shape[1]} labels", ""]
    if args.curve:
        out += _curve(test, runs[:-2], args.test_seed)
    out += [f"Total benchmark time: {time.perf_counter() - t0:.0f} s.", ""]
    print("\n".join(out))
    return 0


def _curve(test: dict, runs: list, seed: int) -> list[str]:
    """Per-label test accuracy of each run trained on the first n training models, n up to all of them."""
    sizes = [n for n in (60, 120, 240, 480) if n < len(test["train"])] + [len(test["train"])]
    out = [f"### Zoo seed {seed}: training models vs per-label test accuracy ({LAYER})", "",
           "| train models | " + " | ".join(map(str, sizes)) + " |", "|---|" + "---|" * len(sizes)]
    for label, kind, cfg in runs:
        accs = [fit(kind, cfg, test, test["train"][:n], test["test"])[0][0] for n in sizes]
        out.append(f"| {label} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
        print(out[-1], flush=True)
    return out + [""]


if __name__ == "__main__":
    sys.exit(main())

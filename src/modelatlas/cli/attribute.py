"""``atlas attribute``: DDM data attribution (cluster x test-sample matrix) and optional LOO validation.

Thin: parse arguments, call :func:`modelatlas.attribution.ddm_attribution` (and
:func:`~modelatlas.attribution.loo_attribution`), write the folder, print a summary.
"""

from __future__ import annotations

import argparse
import math

from modelatlas.cli.argtypes import out_dir, positive_int, seed
from modelatlas.cli.output import echo, tqdm_progress
from modelatlas.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribute", help="which training-data clusters matter for which test samples (DDM)",
                       description="DDM data attribution: per-class k-means clusters, one synthetic sample per "
                                   "cluster by reverse gradient matching, removal by a Newton unlearning step on "
                                   "the distilled set.")
    p.add_argument("--dataset", default="digits", help="registered image dataset (default digits)")
    p.add_argument("--data-root", default=None, help="dataset folder (root= of the loader: cifar10, image-folder)")
    p.add_argument("--clusters-per-class", type=positive_int, default=5, help="k-means clusters per class (default 5)")
    p.add_argument("--out", required=True, type=out_dir, help="output folder (attribution.safetensors/.json/.png): new, empty or a previous attribution's")
    p.add_argument("--test-index", type=int, nargs="+", default=None,
                   help="test samples to plot, 0-based among the test samples used (default 0 1 2, those there are)")
    p.add_argument("--validate", action="store_true", help="also retrain leave-one-cluster-out (ground truth)")
    p.add_argument("--max-train", type=positive_int, default=None, help="use only the first N training examples (default: all)")
    p.add_argument("--max-test", type=positive_int, default=None, help="use only the first N test examples (default: all)")
    p.add_argument("--train-steps", type=int, default=None, help="target-model GD steps (default 100)")
    p.add_argument("--match-steps", type=int, default=None, help="reverse gradient matching steps (default 30)")
    p.add_argument("--unlearn", choices=["newton", "ascent"], default=None,
                   help="online removal step: Newton step on the distilled set (default) or gradient ascent")
    p.add_argument("--damping", type=float, default=None, help="Hessian damping of the Newton step (default 0.1; --unlearn newton only)")
    p.add_argument("--samples-per-cluster", type=positive_int, default=None,
                   help="synthetic samples per cluster (default 1; ~8 for targets trained to convergence)")
    p.add_argument("--weight-decay", type=float, default=None, help="L2 penalty of the target model (default 0)")
    p.add_argument("--seed", type=seed, default=0, help="seed of clustering, init and matching (default 0)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from modelatlas.attribution import ddm_attribution
    from modelatlas.attribution.report import check_out, render_top_clusters, save_attribution

    check_out(args.out)  # before any work: a file or another command's folder is refused in a second
    cfg = _config(args)
    train, (xtr, ytr, xte, yte) = _inputs(args)
    attr = ddm_attribution(xtr, ytr, xte, yte, train.num_classes, cfg, args.seed, tqdm_progress)
    info = {"dataset": train.name, "n_train": len(xtr), "n_test": len(xte), "seed": args.seed, "config": cfg.to_dict()}
    true = _validate(args, attr, cfg, train.num_classes, (xtr, ytr, xte, yte), info) if args.validate else None
    save_attribution(args.out, attr, info, true, png=render_top_clusters(attr, xtr, xte, yte, args.test_index))
    k_total, n_test = attr.matrix.shape
    echo(f"attribution matrix {k_total} clusters x {n_test} test samples in {attr.timings['total_s']:.1f} s "
         f"(online {attr.timings['online_s']:.3f} s); wrote {args.out}")
    if true is not None:
        v = info["validation"]
        echo(f"vs leave-one-cluster-out retraining ({v['loo_wall_s']:.1f} s): Spearman flattened "
             f"{v['flattened']:.3f}, per test sample {v['per_test_mean']:.3f}, within class {_shown(v['within_class'])}; "
             f"speed-up {v['speedup_total']}x total, {v['speedup_online']}x online")
    return 0


def _inputs(args: argparse.Namespace):
    """(train dataset, (x_train, y_train, x_test, y_test)) cut to --max-train / --max-test; errors name the flag."""
    from modelatlas.data import load_dataset

    kw = {"root": args.data_root} if args.data_root else {}
    train, test = load_dataset(args.dataset, "train", **kw), load_dataset(args.dataset, "test", **kw)
    if len(train.input_shape) != 3:
        raise ConfigError(f"dataset {args.dataset!r} is not an image dataset (shape {train.input_shape})")
    xte, yte = test.x[:args.max_test], test.y[:args.max_test]
    if args.test_index is None:  # the default: the first three test samples, or as many as --max-test keeps
        args.test_index = list(range(min(3, len(xte))))
    args.test_index = list(dict.fromkeys(args.test_index))  # '--test-index 0 0' plots sample 0 once
    bad = [j for j in args.test_index if not 0 <= j < len(xte)]
    if bad:
        cut = args.max_test is not None and args.max_test < len(test.x)  # else "the test split has 20" read wrong
        used = f"--max-test {args.max_test} keeps {len(xte)}" if cut else f"the test split has {len(xte)}"
        raise ConfigError(f"--test-index {bad[0]} is out of range: {used} test samples (0 to {len(xte) - 1})")
    return train, (train.x[:args.max_train], train.y[:args.max_train], xte, yte)


def _config(args: argparse.Namespace):
    """DDMConfig from the flags given (the rest keep the library defaults)."""
    from modelatlas.attribution import DDMConfig

    given = (("train_steps", args.train_steps), ("match_steps", args.match_steps), ("unlearn", args.unlearn),
             ("damping", args.damping), ("samples_per_cluster", args.samples_per_cluster),
             ("weight_decay", args.weight_decay))
    if args.damping is not None and args.unlearn == "ascent":  # was silently ignored
        raise ConfigError(f"--damping {args.damping} applies to --unlearn newton only (ascent has no Hessian)")
    return DDMConfig(clusters_per_class=args.clusters_per_class, **{k: v for k, v in given if v is not None})


def _validate(args, attr, cfg, num_classes: int, data, info: dict):
    """Leave-one-cluster-out truth; adds its scores and speed-ups to ``info["validation"]``; returns the truth."""
    from modelatlas.attribution import loo_attribution, spearman_scores, within_class_spearman

    xtr, ytr, xte, yte = data
    true, loo_s = loo_attribution(xtr, ytr, xte, yte, num_classes, attr.assign, cfg, args.seed, tqdm_progress)
    info["validation"] = {**spearman_scores(attr.matrix, true),
                          "within_class": _finite(within_class_spearman(attr.matrix, true, attr.cluster_class, yte)),
                          "loo_wall_s": round(loo_s, 3),
                          "speedup_total": round(loo_s / attr.timings["total_s"], 2),
                          "speedup_online": round(loo_s / max(attr.timings["online_s"], 1e-9), 1)}
    return true


def _finite(x: float) -> float | None:
    """None for NaN (within-class Spearman needs >= 3 clusters per class): strict JSON has no NaN."""
    return x if math.isfinite(x) else None


def _shown(x: float | None) -> str:
    return "n/a (fewer than 3 clusters per class)" if x is None else f"{x:.3f}"

"""``atlas attribute``: DDM data attribution (cluster x test-sample matrix) and optional LOO validation.

Thin: parse arguments, call :func:`modelatlas.attribution.folder.attribute_to_folder` (DDM, optional
leave-one-cluster-out validation, the folder written, resumable with ``--resume``), print a summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modelatlas.cli.argtypes import out_dir, positive_int, seed
from modelatlas.cli.flags import add_field_flags, dashed
from modelatlas.cli.output import echo, tqdm_progress
from modelatlas.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribute", help="which training-data clusters matter for which test samples (DDM)",
                       description="DDM data attribution: per-class k-means clusters, one synthetic sample per "
                                   "cluster by reverse gradient matching, removal by a Newton unlearning step on "
                                   "the distilled set (solved by conjugate gradients where the target is too "
                                   "large for its exact Hessian).")
    p.add_argument("--dataset", default="digits", help="registered image dataset (default digits)")
    p.add_argument("--data-root", default=None, help="dataset folder (root= of the loader: fashion-mnist, cifar10, cifar100, image-folder)")
    p.add_argument("--clusters-per-class", type=positive_int, default=5, help="k-means clusters per class (default 5)")
    p.add_argument("--out", required=True, type=out_dir, help="output folder (attribution.safetensors/.json/.png): new, empty or a previous attribution's")
    p.add_argument("--test-index", type=int, nargs="+", default=None,
                   help="test samples to plot, 0-based among the test samples used (default 0 1 2, those there are)")
    p.add_argument("--validate", action="store_true", help="also retrain leave-one-cluster-out (ground truth)")
    p.add_argument("--max-train", type=positive_int, default=None, metavar="N",
                   help="use N training examples, a seeded (--seed) stratified subset: each class keeps its share, "
                        "also in an image folder read class by class (default: all)")
    p.add_argument("--max-test", type=positive_int, default=None, metavar="N",
                   help="use N test examples, a seeded stratified subset as --max-train's, in their order in the "
                        "split (--test-index counts among them; default: all)")
    p.add_argument("--train-steps", type=int, default=None, help="target-model GD steps (default 100)")
    p.add_argument("--match-steps", type=int, default=None, help="reverse gradient matching steps (default 30)")
    p.add_argument("--unlearn", choices=["auto", "newton", "cg", "ascent"], default=None,
                   help="online removal step: a Newton step on the distilled set (exact Hessian: targets of at most "
                        "20,000 parameters, e.g. digits'), the same step by conjugate gradients on Hessian-vector "
                        "products (cg: any size), or gradient ascent; auto (default): Newton where it fits, else cg")
    p.add_argument("--damping", type=float, default=None,
                   help="Hessian damping of the Newton step (default 0.1, doubled until positive definite; newton and cg)")
    p.add_argument("--cg-iterations", type=int, default=None,
                   help="most conjugate-gradient iterations of --unlearn cg (default 500)")
    p.add_argument("--cg-tolerance", type=float, default=None,
                   help="relative residual at which --unlearn cg stops (default 1e-5)")
    p.add_argument("--samples-per-cluster", type=positive_int, default=None,
                   help="synthetic samples per cluster (default 1; ~8 for targets trained to convergence)")
    p.add_argument("--weight-decay", type=float, default=None, help="L2 penalty of the target model (default 0)")
    p.add_argument("--seed", type=seed, default=0, help="seed of clustering, init and matching (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/checkpoint (same settings)")
    p.set_defaults(func=_run, interrupt_hint=_interrupted)
    add_field_flags(p, dashed("clusters_per_class", "train_steps", "match_steps", "unlearn", "damping",
                              "samples_per_cluster", "weight_decay", "cg_iterations", "cg_tolerance"))  # DDMConfig's fields (_config)


def _run(args: argparse.Namespace) -> int:
    from modelatlas.attribution.checkpoint import check_start, kept_state, progress_of
    from modelatlas.attribution.folder import attribute_to_folder
    from modelatlas.attribution.report import check_out
    from modelatlas.data.image_folder import check_out_outside_images

    check_out(args.out)  # before any work: a file or another command's folder is refused in a second
    check_out_outside_images(args.out, args.dataset, args.data_root)
    check_start(args.out, args.resume)  # an interrupted run's state is not overwritten without --resume
    cfg = _config(args)
    train, data = _inputs(args)
    _say_unlearn(args, cfg, train)
    kept = progress_of(args.out) if args.resume else None
    where = Path(args.out) / "checkpoint"
    said = (lambda: echo(f"resuming from {where}: {_kept(kept)} kept")) if kept else None  # once settings match
    if args.resume and kept_state(args.out) is None:  # an unreadable state is refused below, not started over
        echo(f"nothing to resume in {where}: starting from the beginning")
    attr, info, true = attribute_to_folder(args.out, data, train.num_classes, cfg, args.seed, train.name,
                                           args.validate, args.test_index, args.resume, tqdm_progress,
                                           on_resume=said, class_names=train.classes)
    k_total, n_test = attr.matrix.shape
    when = ("" if not kept else ", before the interruption" if kept["ddm"]  # DDM's timings: the interrupted run's
            else "; the total adds up the parts before and after the interruption")
    echo(f"attribution matrix {k_total} clusters x {n_test} test samples in {attr.timings['total_s']:.1f} s "
         f"(online {attr.timings['online_s']:.3f} s{when}); wrote {args.out}")
    if "cg_iterations" in attr.timings:
        echo(_cg_line(attr.timings))
    if true is not None:
        v = info["validation"]
        echo(f"vs leave-one-cluster-out retraining ({v['loo_wall_s']:.1f} s): Spearman flattened "
             f"{_shown(v['flattened'], '')}, per test sample {_shown(v['per_test_mean'], '')}, within class "
             f"{_shown(v['within_class'])}; "
             f"speed-up {v['speedup_total']}x total, {v['speedup_online']}x online")
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    """The Ctrl-C hint: what ``OUT/checkpoint`` keeps and how to continue, or that nothing of this run was kept."""
    from modelatlas.attribution.checkpoint import progress_of

    kept = progress_of(args.out)
    if kept is None:
        return f"stopped before anything was saved in {args.out}: run the command again"
    where = Path(args.out) / "checkpoint"
    if kept["ddm"] and (Path(args.out) / "attribution.json").is_file():
        return (f"the DDM attribution is written to {args.out} (validation pending) and kept, with "
                f"{kept['loo_done']} of {kept['loo_total']} leave-one-cluster-out retrainings, in {where}; rerun "
                "with --resume to continue")
    return f"{_kept(kept)} kept in {where}; rerun with --resume to continue"


def _kept(kept: dict) -> str:
    """What a checkpoint keeps (:func:`~modelatlas.attribution.checkpoint.progress_of`), to be followed by
    'kept': 'the DDM attribution and 3 of 20 leave-one-cluster-out retrainings are', or before DDM finished
    'DDM's clustering, target model and 12 of 30 matching steps are'."""
    if kept["ddm"]:
        return (f"the DDM attribution and {kept['loo_done']} of {kept['loo_total']} leave-one-cluster-out "
                "retrainings are")
    names = {"clusters": "clustering", "target": "target model"}
    parts = [names[u] for u in kept["units"] if u in names]
    if kept["match"]:
        parts.append(f"{kept['match'][0]} of {kept['match'][1]} matching steps")
    listed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return f"DDM's {listed} {'is' if parts == ['clustering'] else 'are'}"


def _inputs(args: argparse.Namespace):
    """(train dataset, (x_train, y_train, x_test, y_test)) cut to --max-train / --max-test; errors name the flag."""
    from modelatlas.data import load_dataset

    kw = {"root": args.data_root} if args.data_root else {}
    train, test = load_dataset(args.dataset, "train", **kw), load_dataset(args.dataset, "test", **kw)
    if len(train.input_shape) != 3:
        raise ConfigError(f"dataset {args.dataset!r} is not an image dataset (shape {train.input_shape})")
    kept, used = _cut(test, args.max_test, args.seed, "max-test"), _cut(train, args.max_train, args.seed, "max-train")
    if args.test_index is None:  # the default: the first three test samples, or as many as --max-test keeps
        args.test_index = list(range(min(3, len(kept))))
    args.test_index = list(dict.fromkeys(args.test_index))  # '--test-index 0 0' plots sample 0 once
    bad = [j for j in args.test_index if not 0 <= j < len(kept)]
    if bad:
        cut = len(kept) < len(test)  # else "the test split has 20" read wrong
        has = f"--max-test {args.max_test} keeps {len(kept)}" if cut else f"the test split has {len(kept)}"
        raise ConfigError(f"--test-index {bad[0]} is out of range: {has} test samples (0 to {len(kept) - 1})")
    return train, (used.x, used.y, kept.x, kept.y)


def _cut(data, n: int | None, seed: int, flag: str):
    """``data`` cut to a seeded stratified subset of ``n`` (--max-train / --max-test), or whole without ``n``: its
    first n held the first classes only of data read class by class (an image folder)."""
    from modelatlas.seeding import derive_seed

    return data if n is None else data.stratified(n, derive_seed(seed, flag))


def _config(args: argparse.Namespace):
    """DDMConfig from the flags given (the rest keep the library defaults)."""
    from modelatlas.attribution import DDMConfig

    given = (("train_steps", args.train_steps), ("match_steps", args.match_steps), ("unlearn", args.unlearn),
             ("damping", args.damping), ("samples_per_cluster", args.samples_per_cluster),
             ("weight_decay", args.weight_decay), ("cg_iterations", args.cg_iterations),
             ("cg_tolerance", args.cg_tolerance))
    if args.damping is not None and args.unlearn == "ascent":  # was silently ignored
        raise ConfigError(f"--damping {args.damping} applies to --unlearn newton and cg only (ascent has no Hessian)")
    cg_flag = _cg_flag(args)
    if cg_flag and args.unlearn in ("newton", "ascent"):  # would be silently ignored
        raise ConfigError(f"{cg_flag} applies to --unlearn cg only (and auto where it takes cg), not {args.unlearn}")
    return DDMConfig(clusters_per_class=args.clusters_per_class, **{k: v for k, v in given if v is not None})


def _say_unlearn(args: argparse.Namespace, cfg, train) -> None:
    """For --unlearn auto (the default): say which step it takes and why, before any work; a --cg-* flag where it
    takes Newton is refused (it would be ignored). An explicit --unlearn newton too large is refused later, once a
    --resume's settings are compared (its rule: the comparison comes first)."""
    from modelatlas.attribution import ddm

    if cfg.unlearn != "auto":
        return
    method, why = ddm.unlearn_choice(cfg, train.input_shape, train.num_classes)
    if (flag := _cg_flag(args)) and method != "cg":
        raise ConfigError(f"{flag} applies to conjugate-gradient unlearning only, and --unlearn auto (the default) "
                          f"takes {method} for this target model; drop {flag}, or add --unlearn cg")
    echo(f"unlearning: {method} ({why})")


def _cg_flag(args: argparse.Namespace) -> str | None:
    """The first --cg-* flag given, or None."""
    given = [f for f, v in (("--cg-iterations", args.cg_iterations), ("--cg-tolerance", args.cg_tolerance)) if v is not None]
    return given[0] if given else None


def _cg_line(t: dict) -> str:
    """How the conjugate-gradient solve went (``timings``' cg_* keys), with the fix when it did not converge."""
    line = (f"conjugate gradients: {t['cg_iterations']} iterations, relative residual {t['cg_relative_residual']:.1e}, "
            f"damping {t['damping_used']:g}")
    if not t["cg_converged"]:
        line += "; not converged: raise --cg-iterations or --cg-tolerance"
    return line


def _shown(x: float | None, why: str = " (fewer than 3 clusters per class)") -> str:
    """A Spearman score, or 'n/a' where attribution.json has null (undefined: too few clusters, a constant matrix)."""
    return f"n/a{why}" if x is None else f"{x:.3f}"

"""``atlas distill poster``: distil a dataset into one PoDD poster (IPC may be below 1), evaluate, save.

Registered through the hook in :mod:`modelatlas.cli.distill`.
"""

from __future__ import annotations

import argparse

from modelatlas.cli.argtypes import out_dir, positive_int, seed
from modelatlas.cli.flags import add_field_flags, dashed
from modelatlas.cli.output import tqdm_progress


def register(dsub) -> None:
    p = dsub.add_parser("poster", help="distil a dataset into one poster of overlapping crops (PoDD)")
    p.add_argument("--dataset", required=True, help="registered dataset name (atlas data list)")
    p.add_argument("--ipc", type=float, required=True, help="images per class of the poster, e.g. 0.3, 0.5, 1")
    p.add_argument("--out", required=True, type=out_dir, help="result folder (checkpoints go to OUT/checkpoint)")
    p.add_argument("--iterations", type=int, default=None, help="outer iterations (default 200)")
    p.add_argument("--eval-nets", type=positive_int, default=5, help="fresh networks trained for the evaluation (default: 5)")
    p.add_argument("--eval-epochs", type=positive_int, default=None, help="epochs per evaluation net (Adam protocol, 300)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the distillation and evaluation (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--no-learn-labels", action="store_true", help="pixel-count labels instead of PoDDL")
    p.add_argument("--class-order", choices=["poco", "natural"], default=None,
                   help="class layout on the poster: poco (similar classes side by side) or natural (default: poco)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a podd config field (repeatable), e.g. --set window=20")
    p.add_argument("--transform", choices=["identity", "standardize", "zca"], default=None,
                   help="data transform fitted on the training split (default: identity)")
    p.add_argument("--data-root", default=None, help="dataset folder (root= of the loader)")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-subset baseline")
    p.add_argument("--device", default=None, help="cuda / cpu (default: CUDA when present)")
    p.set_defaults(func=_poster, interrupt_hint="progress is kept in {out}/checkpoint; rerun with --resume to continue")
    add_field_flags(p, {**dashed("iterations", "class_order"), "poster_ipc": "--ipc"})


def _poster(args: argparse.Namespace) -> int:
    from modelatlas.cli.distill import flag_into, parse_overrides, show_result
    from modelatlas.cli.output import say_fresh_start
    from modelatlas.distill.methods.podd.api import run_poster

    say_fresh_start(args.resume, args.out, "checkpoint")
    config = parse_overrides(args.overrides)
    flag_into(config, "iterations", args.iterations, f"--iterations {args.iterations}")
    flag_into(config, "learn_labels", False if args.no_learn_labels else None, "--no-learn-labels")
    flag_into(config, "class_order", args.class_order, f"--class-order {args.class_order}")
    info = run_poster(args.dataset, args.ipc, args.out, config, seed=args.seed, eval_nets=args.eval_nets,
                      eval_epochs=args.eval_epochs, transform=args.transform,
                      dataset_kwargs={"root": args.data_root} if args.data_root else None,
                      baseline=not args.no_baseline, progress=tqdm_progress, resume=args.resume, device=args.device)
    show_result(info, args.out, "podd poster")
    return 0

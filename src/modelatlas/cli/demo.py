"""``atlas demo``: build a small zoo with known lineage, recover it from the weights, show the result."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from modelatlas.cli.argtypes import out_dir, positive_int, seed
from modelatlas.cli.flags import add_field_flags, dashed
from modelatlas.cli.lineage import add_recovery_options, config_from_args, show_forest, with_truth
from modelatlas.cli.output import echo, tqdm_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a small zoo, recover its lineage, show each edge marked right or wrong",
                       description="Train a small zoo (3 trees; full fine-tuning and LoRA children) with known "
                                   "lineage, recover the lineage from the weights alone and score it.")
    p.add_argument("--out", type=out_dir, help="zoo folder (kept; reused if already built). Default: a temporary folder")
    p.add_argument("--preset", default="demo", help="zoo preset (default: demo; see `atlas zoo presets`)")
    p.add_argument("--seed", type=seed, default=0, help="zoo seed (default 0)")
    p.add_argument("--workers", type=positive_int, default=2, help="training processes (default 2)")
    add_recovery_options(p)
    add_field_flags(p, dashed("preset", "workers", "out"))  # the zoo's (its seed is --seed, checked by argparse)
    p.set_defaults(func=_demo, interrupt_hint="with --out, finished models are kept and a rerun reuses them")


def _demo(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # check the options before training anything
    if args.out is not None:
        return _run(args, config, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="atlas-demo-") as tmp:
        return _run(args, config, Path(tmp))


def _run(args: argparse.Namespace, config, out: Path) -> int:
    from modelatlas.cli.zoo import finished_before, how_built
    from modelatlas.lineage import LineageRecovery
    from modelatlas.zoo import make_zoo, preset
    from modelatlas.zoo.store import open_zoo_models

    t0, zoo = time.perf_counter(), preset(args.preset, seed=args.seed)
    reused = finished_before(zoo, out)  # finished models are reused, not trained (told before the build starts)
    verb = "reusing the zoo" if reused >= zoo.n_models else "building zoo"  # all built before: nothing to train
    echo(f"{verb} '{args.preset}' ({zoo.n_models} models, {zoo.trees} trees, method {zoo.method}) in {out}")
    manifest = make_zoo(zoo, out, workers=args.workers, progress=tqdm_progress)
    t1 = time.perf_counter()
    models = open_zoo_models(manifest)  # adapter-stored models merged onto their parents; names are folder names
    try:
        forest = LineageRecovery(config).fit(models, progress=tqdm_progress).forest_
    finally:
        for ck in models:
            ck.close()
    t2 = time.perf_counter()
    echo(f"{how_built(len(manifest.reused), len(manifest))} in {t1 - t0:.0f} s; recovered from the weights "
         f"alone in {t2 - t1:.2f} s "
         f"(✓ = true edge, ✗ = wrong)\n")
    show_forest(with_truth(forest, manifest), manifest)
    return 0

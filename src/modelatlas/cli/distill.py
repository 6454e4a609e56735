"""``atlas distill run|eval`` (and ``poster``, added by :mod:`modelatlas.cli.distill_poster` when present).

Thin wrappers: parse arguments, call :func:`modelatlas.distill.run_distillation` /
:func:`modelatlas.distill.evaluate_result`, print the result.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from modelatlas.cli.argtypes import out_dir, positive_int, seed
from modelatlas.cli.flags import add_field_flags, dashed
from modelatlas.cli.output import counted, echo, say_fresh_start, tqdm_progress, warn
from modelatlas.errors import ConfigError

# Further ``atlas distill`` subcommands: modules under modelatlas.cli exposing ``register(distill_subparsers)``.
EXTRA_SUBCOMMAND_MODULES = ["distill_poster"]
# each method's default `iterations` (its config's; a test checks them: the registry imports torch, too slow here)
ITERATIONS_HELP = ("outer iterations (default: the method's: dc, dsa, ratbptt, podd, teddy 200; dm 500; mtt 300; "
                   "hello 100; random and herding take none)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a dataset into a few synthetic images",
                       description="Dataset distillation: learn a small synthetic training set.")
    dsub = p.add_subparsers(dest="distill_command", metavar="SUBCOMMAND")
    _register_run(dsub)
    ev = dsub.add_parser("eval", help="re-evaluate a saved result folder (fresh nets on the real test set)")
    ev.add_argument("dir", help="result folder written by `atlas distill run`")
    ev.add_argument("--eval-nets", type=positive_int, default=None, help="networks to train (default: as saved)")
    ev.add_argument("--eval-epochs", type=positive_int, default=None, help="epochs per network (default: as saved)")
    ev.add_argument("--seed", type=seed, default=None, help="seed of the evaluation nets (default: as saved)")
    ev.add_argument("--device", default=None, help="cuda / cpu (default: CUDA when present)")
    ev.add_argument("--data-root", default=None, help="dataset folder, when it has moved since the run (default: as saved)")
    ev.set_defaults(func=_eval)
    for name in EXTRA_SUBCOMMAND_MODULES:
        try:
            importlib.import_module(f"modelatlas.cli.{name}").register(dsub)
        except ModuleNotFoundError as e:
            if e.name != f"modelatlas.cli.{name}":
                raise


def _register_run(dsub) -> None:
    r = dsub.add_parser("run", help="distil a dataset, evaluate it and write a result folder")
    r.add_argument("--method", required=True, help="random, herding, dc, dsa, dm, mtt, ratbptt, podd, teddy or hello "
                                                  "(docs/distill.md)")
    r.add_argument("--dataset", required=True, help="registered dataset name (atlas data list)")
    r.add_argument("--ipc", type=positive_int, required=True, help="synthetic images per class")
    r.add_argument("--out", required=True, type=out_dir, help="result folder (checkpoints go to OUT/checkpoint)")
    r.add_argument("--iterations", type=int, default=None, help=ITERATIONS_HELP)
    r.add_argument("--eval-nets", type=positive_int, default=5, help="fresh networks trained for the evaluation (default: 5)")
    r.add_argument("--eval-epochs", type=positive_int, default=None, help="epochs per evaluation net (default: SGD protocol 300, 1000 with DSA; Adam protocol (ratbptt, podd) 300)")
    r.add_argument("--seed", type=seed, default=0, help="seed of the distillation and evaluation (default: 0)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a method config field (repeatable), e.g. --set lr_img=0.5")
    r.add_argument("--transform", choices=["identity", "standardize", "zca"], default=None,
                   help="data transform fitted on the training split (default: identity)")
    r.add_argument("--data-root", default=None, help="dataset folder (root= of the loader)")
    r.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from the set of this result folder (same dataset and ipc), e.g. DM's for hello")
    r.add_argument("--no-baseline", action="store_true", help="skip the random-subset baseline")
    r.add_argument("--device", default=None, help="cuda / cpu (default: CUDA when present)")
    r.set_defaults(func=_run, interrupt_hint="progress is kept in {out}/checkpoint; rerun with --resume to continue")
    add_field_flags(r, dashed("iterations", "ipc"))  # the method config's other fields keep their --set names


def parse_overrides(items: list[str]) -> dict:
    """``["lr_img=0.5", "init=noise"]`` -> ``{"lr_img": 0.5, "init": "noise"}`` (values parsed as JSON when possible)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        except RecursionError:  # '[[[...': was a traceback
            raise ConfigError(f"--set {key}: the value is not valid JSON (nested too deeply)") from None
        except ValueError as e:  # an integer of 5,000 digits: was a traceback
            raise ConfigError(f"--set {key}: the value is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    return out


def flag_into(config: dict, field: str, value, flag: str) -> None:
    """``config[field] = value`` unless ``value`` is None (the flag not given); a ``--set`` of the field to
    another value is refused, naming both (the flag replaced it without a word)."""
    if value is None:
        return
    if field in config and config[field] != value:
        raise ConfigError(f"{flag} and --set {field}={json.dumps(config[field])} differ; give it once")
    config[field] = value


def _summary(label: str, ev: dict) -> str:
    accs = ", ".join(f"{a:.1f}" for a in ev["accuracies"])
    return f"{label}: {ev['mean']:.2f} +- {ev['std']:.2f} % test accuracy ({counted(len(ev['accuracies']), 'net')}: {accs})"


def _run(args: argparse.Namespace) -> int:
    from modelatlas.distill import run_distillation

    say_fresh_start(args.resume, args.out, "checkpoint")
    config = parse_overrides(args.overrides)
    flag_into(config, "iterations", args.iterations, f"--iterations {args.iterations}")
    _say_ignored_iterations(args.method, config)
    info = run_distillation(args.method, args.dataset, args.ipc, args.out, config=config, seed=args.seed,
                            eval_nets=args.eval_nets, eval_epochs=args.eval_epochs, transform=args.transform,
                            dataset_kwargs={"root": args.data_root} if args.data_root else None,
                            baseline=not args.no_baseline, progress=tqdm_progress, resume=args.resume,
                            device=args.device, init_from=args.init_from)
    show_result(info, args.out, f"{args.method} ipc {args.ipc}")
    return 0


def _say_ignored_iterations(method: str, config: dict) -> None:
    """A warning when ``iterations`` is given to a method that has none (``random``, ``herding``: their
    default is 0): the run went on as if the flag were not there, saying nothing."""
    from modelatlas.distill import methods

    if config.get("iterations") and getattr(methods.get(method).config_cls, "iterations", None) == 0:
        warn(f"--method {method} takes no iterations (it picks real images); {config['iterations']} is ignored")


def show_result(info: dict, out: str, label: str) -> None:
    """The evaluation of a result (``label`` names the set), its baseline's, the protocol and what was written;
    a PoDD poster (``distill run --method podd`` or ``distill poster``) is named by its size, IPC and crops."""
    lay, files, baseline = info.get("poster"), "", "random real subset, same protocol"
    if lay is not None:
        label = f"podd poster {lay['height']}x{lay['width']} ({info['ipc']:.3g} IPC, {lay['n_x']}x{lay['n_y']} crops)"
        files, baseline = " (poster.png)", f"random real subset, {info['baseline_ipc']} per class, same protocol"
    echo(_summary(f"{label} on {info['dataset']}", info["evaluation"]))
    if "baseline_random" in info:
        echo(_summary(baseline, info["baseline_random"]))
    echo(f"protocol: {info['evaluation']['protocol']['description']}")
    parts = " (all parts of the resumed run)" if info.get("resumed") else ""  # else a resume read as a straight run
    echo(f"distillation wall time {info['wall_time_s']:.1f} s{parts}; {written(out, info, files)}")


def written(out: str, info: dict, files: str = "") -> str:
    """'wrote OUT' (+ ``files``), or that a resume found this finished result there and wrote nothing."""
    return f"{out} already held this finished result (nothing written)" if info.get("reused") else f"wrote {out}{files}"


def _eval(args: argparse.Namespace) -> int:
    from modelatlas.distill import evaluate_result

    ev = evaluate_result(args.dir, eval_nets=args.eval_nets, eval_epochs=args.eval_epochs, seed=args.seed,
                         progress=tqdm_progress, device=args.device,
                         dataset_kwargs={"root": args.data_root} if args.data_root else None)
    echo(_summary(args.dir, ev))
    echo(f"protocol: {ev['protocol']['description']}")
    echo(f"stored in {Path(args.dir) / 'result.json'} under 'reevaluation' (its 'evaluation' is kept)")
    return 0

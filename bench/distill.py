"""Dataset-distillation benchmark: random / herding / DC / DSA / DM / full data at IPC 1 and 10.

Each method distils the training split (its default config, iterations set below to fit a CPU budget), then
``--eval-nets`` fresh networks are trained on the synthetic set and tested on the real test split under the
method's protocol (DC/DM SGD protocol; DSA on during evaluation for DSA and DM, 1000 epochs then; 300
otherwise). The random-real-subset baseline is reported under every protocol the other methods use. Prints a markdown table and
writes JSON (``--json``). ``--val 0.1`` holds out a seeded 10% of the training split and scores on it instead
of the test split (for choosing settings). ``--save DIR`` keeps each synthetic set; ``--init-from DIR/dm-ipc10``
starts the methods from a saved set (e.g. HeLlO's labels on DM's images); ``--eval-saved DIR...`` scores saved
sets again (e.g. with more evaluation nets) under their methods' protocols, with ``--methods random`` beside them.

    python bench/distill.py --dataset digits --ipc 1 10
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from modelatlas.allocator import keep_freed_memory
from modelatlas.atomic import atomic_write_json
from modelatlas.data import load_dataset
from modelatlas.distill import default_protocol, distill, evaluate_synthetic, methods
from modelatlas.distill.evaluate import EvalProtocol, evaluate_full_data
from modelatlas.distill.synthetic import SyntheticSet

# Outer iterations per (method, ipc) sized for ~2 CPU cores (papers: DC/DSA 1000, DM 20000).
ITERATIONS = {"digits": {"dc": {1: 200, 10: 40}, "dsa": {1: 200, 10: 40}, "dm": {1: 1000, 10: 1000}},
              "fashion-mnist": {"dc": {1: 50, 10: 10}, "dsa": {1: 50, 10: 10}, "dm": {1: 300, 10: 300}}}


def _row(name: str, ipc, ev, wall: float | None, iterations) -> dict:
    return {"method": name, "ipc": ipc, "mean": round(ev.mean, 2), "std": round(ev.std, 2),
            "accuracies": [round(a, 2) for a in ev.accuracies], "protocol": ev.protocol["description"],
            "wall_time_s": None if wall is None else round(wall, 1), "iterations": iterations}


def _known(method: str, fields: dict) -> dict:
    """The entries of ``fields`` that ``method``'s config has."""
    return {k: v for k, v in fields.items() if k in methods.get(method).config_cls.__dataclass_fields__}


def _iterations(method: str, cfg: dict) -> int | None:
    """The outer iterations the run used: the config's, else the method's default; None for a method
    without any (random subset, herding: their ``iterations`` field is ignored)."""
    field = methods.get(method).config_cls.__dataclass_fields__["iterations"]
    return cfg.get("iterations", field.default) if field.default else None


def _chosen(native: EvalProtocol, args) -> list[EvalProtocol]:
    """``--protocols``: the method's own protocol ("native") and/or the SGD or Adam protocol with DSA."""
    # another kind takes its own default lr (SGD 0.01), not the native one (RaT-BPTT/PoDD's Adam inner_lr)
    return [native if k == "native" else replace(native, kind=k, dsa=True, lr=native.lr if k == native.kind else None)
            for k in args.protocols]


def _run_protocols(method: str, proto: EvalProtocol, args, cfg: dict, in_shape) -> list[EvalProtocol]:
    """``--protocols`` when given; else the method's own, or every protocol of the run for the random subset."""
    if args.protocols != ["native"]:
        return _chosen(proto, args)
    return _baseline_protocols(proto, args, cfg, in_shape) if method == "random" else [proto]


def _baseline_protocols(proto: EvalProtocol, args, cfg: dict, in_shape) -> list[EvalProtocol]:
    """The random subset is scored under every protocol the other methods of the run (and the saved sets
    of ``--eval-saved``) use."""
    extra = json.loads(args.config) if args.config else {}
    others = [m for m in args.methods if m != "random"] + [s.meta["method"] for s in args.saved_sets]
    # (kind, DSA, lr) of each: RaT-BPTT/PoDD are scored under Adam at their inner lr
    used = {(p.kind, p.dsa, p.lr) for p in (default_protocol(m, _known(m, extra), in_shape) for m in others)}
    return [replace(proto, kind=k, dsa=d, lr=lr) for k, d, lr in sorted(used, key=lambda u: (u[0], u[1], u[2] or 0))
            ] or [proto]


def run(args: argparse.Namespace) -> list[dict]:
    tr = load_dataset(args.dataset, "train")
    # --val: tune on a seeded fraction of the training split (seed + 12345, as bench/distill_poster.py)
    tr, te = tr.holdout(args.val, args.seed + 12345) if args.val else (tr, load_dataset(args.dataset, "test"))
    rows = _eval_saved(args, tr, te)
    init = SyntheticSet.load(args.init_from) if args.init_from else None
    iters = ITERATIONS.get(args.dataset, ITERATIONS["fashion-mnist"])
    extra = json.loads(args.config) if args.config else {}
    for ipc in args.ipc:
        for method in args.methods:
            cfg = _known(method, extra)
            if args.iterations is not None and _iterations(method, {}):
                cfg["iterations"] = args.iterations  # every iterative method, not only those in ITERATIONS
            elif method in iters:  # an IPC without an entry takes the nearest one's (the row records it)
                cfg["iterations"] = iters[method][min(iters[method], key=lambda k: (abs(k - ipc), k))]
            start = time.perf_counter()
            syn = distill(method, tr, ipc, cfg, seed=args.seed, init=init)
            wall = time.perf_counter() - start
            if args.save:
                syn.save(Path(args.save) / f"{method}-ipc{ipc}")
            proto = default_protocol(method, cfg, tr.input_shape, args.eval_nets, args.eval_epochs)
            for p in _run_protocols(method, proto, args, cfg, tr.input_shape):
                ev = evaluate_synthetic(syn, te, p, seed=args.seed)
                rows.append(_row(method, ipc, ev, wall, _iterations(method, cfg)))
                print(json.dumps(rows[-1]), flush=True)
    if args.full:
        proto = default_protocol("random", _known("random", extra), tr.input_shape, args.eval_nets, args.full_epochs)
        start = time.perf_counter()
        ev = evaluate_full_data(tr, te, proto, seed=args.seed)
        rows.append(_row("full data", "all", ev, None, None))
        rows[-1]["eval_time_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _eval_saved(args: argparse.Namespace, tr, te) -> list[dict]:
    """Rows for the sets of ``--eval-saved`` (``--save`` folders), each under its method's protocol."""
    extra = json.loads(args.config) if args.config else {}
    rows = []
    for folder, syn in zip(args.eval_saved, args.saved_sets):
        method = syn.meta["method"]
        proto = default_protocol(method, _known(method, extra), tr.input_shape, args.eval_nets, args.eval_epochs)
        for p in _chosen(proto, args):
            ev = evaluate_synthetic(syn, te, p, seed=args.seed)
            rows.append(_row(method, syn.ipc, ev, None, None) | {"set": folder})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| method | IPC | test acc % (mean +- std) | distill time s | iterations | protocol |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        wall = "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.1f}"
        lines.append(f"| {r['method']} | {r['ipc']} | {r['mean']:.1f} +- {r['std']:.1f} | {wall} | "
                     f"{r['iterations'] or ''} | {r['protocol']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--methods", nargs="*", default=None,
                    help="default: random herding dc dsa dm (none with --eval-saved; bare --methods: none, e.g. with --full)")
    ap.add_argument("--iterations", type=int, default=None, help="override every method's outer iterations")
    ap.add_argument("--config", default=None, help="JSON of config fields applied to every method")
    ap.add_argument("--eval-nets", type=int, default=5)
    ap.add_argument("--eval-epochs", type=int, default=None)
    ap.add_argument("--full", action="store_true", help="also train on the full training set")
    ap.add_argument("--full-epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--val", type=float, default=None,
                    help="tune: hold out this fraction of the training split and score on it (test never read)")
    ap.add_argument("--save", default=None, help="save each synthetic set to SAVE/METHOD-ipcK")
    ap.add_argument("--init-from", default=None,
                    help="start every method from this saved synthetic set (a --save folder) instead of real images")
    ap.add_argument("--protocols", nargs="+", default=["native"], choices=["native", "adam", "sgd"],
                    help="score every set under its method's protocol (native) and/or SGD+DSA / Adam+DSA")
    ap.add_argument("--eval-saved", nargs="+", default=[], metavar="DIR",
                    help="also evaluate these saved sets (--save folders) under their methods' protocols")
    args = ap.parse_args()
    args.saved_sets = [SyntheticSet.load(d) for d in args.eval_saved]
    if args.methods is None:
        args.methods = [] if args.eval_saved else ["random", "herding", "dc", "dsa", "dm"]
    keep_freed_memory()  # large blocks stay mapped between steps (modelatlas.allocator)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run(args)
    print(table(rows))
    print(f"total {time.perf_counter() - start:.0f} s on {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    if args.json:
        atomic_write_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "saved_sets"},
                                      "rows": rows}, indent=1)


if __name__ == "__main__":
    main()

"""Trajectory, unrolled and poster distillation benchmark: MTT and RaT-BPTT at IPC 1/10, PoDD posters at
0.3 / 0.5 / 1 IPC, each beside the random real subset under the same protocol.

Every run distils the training split, then ``--eval-nets`` fresh networks are trained on the synthetic set
(PoDD: all crops with their labels) and tested on the real test split under the method's protocol: MTT the
SGD protocol with DSA (1000 epochs unless ``--eval-epochs``), RaT-BPTT and PoDD the Adam protocol (lr 1e-3,
batch 256, DSA, 300 epochs). The random baseline uses ceil(ipc) real images per class under each protocol.

    python bench/distill_poster.py --dataset digits --runs mtt:1 mtt:10 ratbptt:1 ratbptt:10 podd:0.3 podd:0.5 podd:1

Tuning: ``--val 0.2`` holds out a seeded 20% of the TRAINING split, distils on the rest and scores on the held-out
part (the test split is never read), e.g.

    python bench/distill_poster.py --runs podd:0.5 --val 0.2 --iterations 100 --eval-nets 2 --eval-epochs 100 \
        --config '{"lr_img": 0.1}'

One protocol for everything: ``--protocols adam sgd`` scores every distilled set (and the random subset) under
each listed protocol (``native`` = the method's own; ``adam`` / ``sgd`` = that protocol with DSA) instead of
the method's own. ``--baseline-draws 5`` pools the random subset over 5 draws (seeds seed..seed+4: different
subsets and networks), since one draw moves by 6-8 points at IPC 1. ``METHOD:IPC:ITERATIONS`` sets one
entry's outer iterations (e.g. ``dm:1:1000``; methods without a bench default get 200).
``--checkpoint-dir DIR`` makes runs of hours survive a stop: rerun the same command and each run continues
from its last checkpoint (identical result to an uninterrupted run; its distill time is then this process's).
Progress bars go to stderr on a terminal; ``ATLAS_PROGRESS=1`` draws them into a log file too.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from modelatlas.allocator import keep_freed_memory
from modelatlas.atomic import atomic_write_json
from modelatlas.cli.output import tqdm_progress
from modelatlas.data import load_dataset
from modelatlas.distill import default_protocol, distill, evaluate_random_baseline, evaluate_synthetic
from modelatlas.distill.evaluate import EvalResult

# Outer iterations per (method, dataset) sized for ~2 shared CPU cores (papers: thousands).
ITERATIONS = {"digits": {"mtt": 200, "ratbptt": 100, "podd": 200},
              "fashion-mnist": {"mtt": 50, "ratbptt": 40, "podd": 40}}


def _row(name, ipc, ev, wall, iterations, extra=None) -> dict:
    return {"method": name, "ipc": ipc, "mean": round(ev.mean, 2), "std": round(ev.std, 2),
            "accuracies": [round(a, 2) for a in ev.accuracies], "protocol": ev.protocol["description"],
            "wall_time_s": None if wall is None else round(wall, 1), "iterations": iterations, **(extra or {}),
            **({"draw_means": ev.protocol["draw_means"]} if "draw_means" in ev.protocol else {})}


def protocols(method: str, cfg: dict, tr, args) -> list:
    """The evaluation protocols of one run: the method's own, or each of ``--protocols`` (with DSA)."""
    native = default_protocol(method, cfg, tr.input_shape, args.eval_nets, args.eval_epochs)
    # another kind takes its own default lr (SGD 0.01; Adam the set's learned lr or 1e-3), not the native
    # protocol's (RaT-BPTT/PoDD's Adam inner_lr 1e-3 would otherwise become SGD's lr)
    return [native if k == "native" else replace(native, kind=k, dsa=True, lr=native.lr if k == native.kind else None)
            for k in args.protocols]


def random_baseline(tr, te, ipc: int, proto, args) -> EvalResult:
    """The random real subset pooled over ``--baseline-draws`` draws (seeds seed, seed+1, ...)."""
    runs = [evaluate_random_baseline(tr, te, ipc, proto, args.seed + d, tqdm_progress) for d in range(args.baseline_draws)]
    accs = [a for r in runs for a in r.accuracies]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    draws = [round(r.mean, 2) for r in runs]
    return EvalResult(statistics.fmean(accs), std, accs, {**runs[0].protocol, "draw_means": draws})


def one_run(entry: str, tr, te, args, baselines: dict):
    method, ipc, iters = parse_entry(entry)
    cfg = dict(json.loads(args.config)) if args.config else {}  # every run (a field its method lacks: an error)
    default_iters = ITERATIONS.get(args.dataset, ITERATIONS["fashion-mnist"]).get(method, 200)
    cfg["iterations"] = iters or args.iterations or default_iters
    int_ipc = max(1, math.ceil(ipc))
    if method == "podd":
        cfg["poster_ipc"] = float(ipc)
    ckpt = Path(args.checkpoint_dir) / entry.replace(":", "_") if args.checkpoint_dir else None
    resume = ckpt is not None and (ckpt / "checkpoint.json").is_file()
    start = time.perf_counter()
    syn = distill(method, tr, int_ipc, cfg, seed=args.seed, checkpoint_dir=ckpt, resume=resume,
                 progress=tqdm_progress)
    wall = time.perf_counter() - start  # of this process only when resumed (see the row's "resumed")
    extra = {"resumed": True} if resume else {}
    if method == "podd":
        lay = syn.meta["poster"]
        extra |= {"actual_ipc": round(syn.meta["poster_ipc"], 3),
                 "poster": f"{lay['height']}x{lay['width']}, {lay['n_x']}x{lay['n_y']} crops"}
    for proto in protocols(method, cfg, tr, args):  # rows are yielded as soon as each is scored
        ev = evaluate_synthetic(syn, te, proto, seed=args.seed, progress=tqdm_progress)
        yield _row(method, ipc, ev, wall, cfg["iterations"], extra)
        key = (proto.resolved().to_dict()["description"], int_ipc)  # the whole protocol (lr, net, epochs, ...)
        if key not in baselines and args.baseline_draws > 0:
            baselines[key] = _row("random", int_ipc, random_baseline(tr, te, int_ipc, proto, args), None, None)
            yield baselines[key]


def parse_entry(entry: str) -> tuple[str, float, int | None]:
    """``METHOD:IPC[:ITERATIONS]`` -> (method, ipc, iterations or None)."""
    parts = entry.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--runs entry {entry!r}: expected METHOD:IPC or METHOD:IPC:ITERATIONS")
    return parts[0], float(parts[1]), int(parts[2]) if len(parts) == 3 else None


def table(rows: list[dict]) -> str:
    lines = ["| method | IPC | test acc % (mean +- std) | distill time s | iterations | notes | protocol |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.1f}"
        note = f"{r['poster']} ({r['actual_ipc']} IPC)" if "poster" in r else ""
        note = f"draws {r['draw_means']}" if "draw_means" in r else note
        lines.append(f"| {r['method']} | {r['ipc']} | {r['mean']:.1f} +- {r['std']:.1f} | {wall} | "
                     f"{r['iterations'] or ''} | {note} | {r['protocol']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--runs", nargs="+", default=["mtt:1", "mtt:10", "ratbptt:1", "ratbptt:10", "podd:0.3",
                                                  "podd:0.5", "podd:1"], help="METHOD:IPC entries")
    ap.add_argument("--iterations", type=int, default=None, help="override every method's outer iterations")
    ap.add_argument("--config", default=None, help="JSON of config fields applied to every run")
    ap.add_argument("--eval-nets", type=int, default=5)
    ap.add_argument("--eval-epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--protocols", nargs="+", default=["native"], choices=["native", "adam", "sgd"],
                    help="score every set under each of these (native: the method's own; adam/sgd: with DSA)")
    ap.add_argument("--baseline-draws", type=int, default=1, help="random subsets pooled (0: no baseline)")
    ap.add_argument("--val", type=float, default=None, help="tune: hold out this fraction of train, score on it")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="checkpoint each run under DIR/METHOD_IPC[_ITERS] (every config checkpoint_every "
                         "iterations); a run whose checkpoint exists there is resumed")
    args = ap.parse_args()
    keep_freed_memory()  # large blocks stay mapped between steps (modelatlas.allocator)
    torch.set_num_threads(args.threads)
    tr = load_dataset(args.dataset, "train")
    # seed + 12345: the validation split of the documented tuning runs
    tr, te = tr.holdout(args.val, args.seed + 12345) if args.val else (tr, load_dataset(args.dataset, "test"))
    start, rows, baselines = time.perf_counter(), [], {}
    for entry in args.runs:
        for r in one_run(entry, tr, te, args, baselines):
            rows.append(r)
            print(json.dumps(r), flush=True)
            if args.json:  # after every row: a stopped run keeps what it finished
                atomic_write_json(args.json, {"args": vars(args), "rows": rows}, indent=1)
    print(table(rows))
    print(f"total {time.perf_counter() - start:.0f} s on {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()

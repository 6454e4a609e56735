"""Where does StatNN's signal come from? StatNN (9 weight statistics per tensor + boosting) on a wide
class-subset zoo (:mod:`bench.probex_wide`'s family), given every tensor, each tensor alone, and every tensor
but the classifier's. Same zoo arguments as ``bench/probex_wide.py`` (a cached zoo is reused, not rebuilt).

    python bench/statnn_tensors.py --zoo /tmp/probex512 --children 400 --hidden 512 --seed 7

Prints a markdown table: per-label and exact-set test accuracy (chance 0.5 per label), the same 80/20
train/test split of the zoo's models as probex_wide.py.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from modelatlas.probex import ProbeXConfig
from modelatlas.probex.families import LAYERS

_spec = importlib.util.spec_from_file_location("probex_wide", Path(__file__).with_name("probex_wide.py"))
pw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pw)


def subsets(names: list[str]) -> list[tuple[str, list[str]]]:
    """(label, tensor names): every tensor, each alone, every tensor but the classifier's."""
    rows = [("every tensor (the benchmark's StatNN)", names)]
    rows += [(f"`{n}` alone", [n]) for n in names]
    rows.append(("every tensor but `classifier.*`", [n for n in names if not n.startswith("classifier.")]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", required=True)
    p.add_argument("--children", type=int, default=400)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--seed", type=int, required=True, help="the zoo seed (folder ZOO/seedN)")
    p.add_argument("--ft-steps", default="30,60")
    p.add_argument("--ft-lr", default="1e-4,3e-4")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ft = {"ft_steps": tuple(map(int, args.ft_steps.split(","))), "ft_lr": tuple(map(float, args.ft_lr.split(",")))}
    names = [f"{n}.{k}" for n in LAYERS for k in ("weight", "bias")]
    d, build, _, _ = pw.load(Path(args.zoo), args.seed, args.children, args.hidden, names, ft)
    cfg = ProbeXConfig(epochs=1, seed=0)  # StatNN uses only the seed
    out = [f"Command: `python bench/statnn_tensors.py --zoo {args.zoo} --children {args.children} --hidden "
           f"{args.hidden} --seed {args.seed} --ft-steps {args.ft_steps} --ft-lr {args.ft_lr}` (1 thread; zoo build "
           f"{build:.0f} s, 0 when cached).", "",
           f"| StatNN input (zoo seed {args.seed}, {len(d['train'])} train / {len(d['test'])} test models) "
           "| per-label acc | exact-set acc | features |", "|---|---|---|---|"]
    for label, keep in subsets(names):
        (acc, ex), _, _ = pw.pb.fit_eval("statnn", cfg, pw.LAYER, [(d["layers"], d["y"], d["train"])],
                                         (d["layers"], d["y"], d["test"]), stats=keep)
        out.append(f"| {label} | {acc:.3f} | {ex:.3f} | {9 * len(keep)} |")
        print(out[-1], flush=True)
    out += ["", f"Total: {time.perf_counter() - t0:.0f} s.", ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

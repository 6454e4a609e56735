"""A folder of GGUF files of wide layers, for timing ``atlas lineage recover`` on quantized models.

    python bench/lineage_read_once.py --quantize /tmp/llcpp/.../build/bin/llama-quantize --work /tmp/once --width 1024
    atlas lineage recover /tmp/once --out forest.json

A llama-architecture model (2 blocks, width ``--width``, t(5)-distributed weights; bench/lineage_llamacpp.py's
model) and four fine-tunes of it (a, b from the base, a1 from a, b1 from b; each 2-D weight moved by 2 % of
its standard deviation) are written as F32 GGUF and quantized by llama-quantize. The folder holds the base as
F32 and as Q4_K_M (a copy: tested by requantizing, and for being made from it by its grid), and the
fine-tunes only quantized (stand-ins, their rounding taken out): a as Q4_0 and Q8_0, b as IQ4_XS, a1 as Q8_0,
b1 as Q4_K_M. The default layers (square matrices) are the 8 attention matrices of width x width.

    python bench/lineage_read_once.py --measure /tmp/once

times, per quantization type in the folder, one layer's read and its rounding sums as lineage computes them
(:func:`~modelatlas.lineage.rounding.rounding_sums`, the variance included) on one torch thread, the least CPU
time of five: run it with the sources before and after a change (a ``rounding_sums`` that takes no scratch is
called without).
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import lineage_llamacpp as L  # noqa: E402  (the model and its F32 writer)

TREE = {"a": "base", "b": "base", "a1": "a", "b1": "b"}  # child -> parent
FILES = {"base": ["F32", "Q4_K_M"], "a": ["Q4_0", "Q8_0"], "b": ["IQ4_XS"], "a1": ["Q8_0"], "b1": ["Q4_K_M"]}
STEP = 0.02  # a fine-tune's move, in standard deviations of each weight matrix


def make_models(width: int, seed: int, tree: dict[str, str] | None = None,
                blocks: int = 2) -> dict[str, dict[str, np.ndarray]]:
    """The base and its fine-tunes (``tree``, child -> parent, parents first; :data:`TREE` by default), name ->
    tensors; ``blocks`` decoder blocks (bench/lineage_kquant_tree.py's larger tree shares this recipe)."""
    L.E, L.F, L.V, L.L = width, 2 * width, width, blocks  # the model's sizes are the module's
    rng = np.random.default_rng(seed)
    models = {"base": L.make_weights(rng)}
    for child, parent in (TREE if tree is None else tree).items():
        models[child] = {k: v + (STEP * v.std() * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2
                         else v for k, v in models[parent].items()}
    return models


def best_ms(fn, runs: int = 5) -> float:
    """The least CPU time of ``runs`` calls of ``fn``, in ms: on one thread, the work itself, whatever other
    jobs hold the cores (their wall time varied 2-5x with the load)."""
    times = []
    for _ in range(runs):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * min(times)


def measure(folder: Path) -> None:
    """Per quantization type in ``folder``: a square layer of it (the first one found), its read and rounding
    sums (:func:`time_layer`)."""
    import torch

    from modelatlas.weights import open_checkpoint

    torch.set_num_threads(1)  # other jobs share the cores: a second thread waits on them
    print("| type | layer | read (ms) | rounding sums (ms) | ratio |\n|---|---|---|---|---|")
    done = set()
    for path in sorted(folder.glob("*.gguf")):
        with open_checkpoint(path) as ck:
            for t in ck.tensors():
                kind = ck.quantization(t.name)
                if kind is not None and kind not in done and len(t.shape) == 2 and t.shape[0] == t.shape[1]:
                    done.add(kind)
                    read, sums = time_layer(ck, t.name)
                    print(f"| {kind} | {t.name} {t.shape} | {read:.1f} | {sums:.1f} | {sums / read:.2f} |")


def time_layer(ck, name: str) -> tuple[float, float]:
    """(read, rounding sums) of layer ``name`` of ``ck``, best of five, in ms; the sums in a reused scratch
    where :func:`~modelatlas.lineage.rounding.rounding_sums` takes one (not before session 31)."""
    import inspect

    from modelatlas.lineage import rounding as R

    row = ck.read(name).reshape(1, -1)  # (1, P)
    extra = {"work": R.RoundingWork(row.numel())} if "work" in inspect.signature(R.rounding_sums).parameters else {}
    return best_ms(lambda: ck.read(name)), best_ms(lambda: R.rounding_sums(ck, name, row, 0.0, **extra))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", type=Path, help="llama.cpp's llama-quantize binary")
    ap.add_argument("--work", type=Path, help="new folder for the GGUF files")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", type=Path, help="a folder written before: time reads and rounding sums")
    args = ap.parse_args()
    if args.measure is not None:
        return measure(args.measure)
    if args.quantize is None or args.work is None:
        ap.error("--quantize and --work are needed to write a folder")
    args.work.mkdir(parents=True)
    scratch = args.work.with_name(args.work.name + "-f32")
    scratch.mkdir()
    for name, tensors in make_models(args.width, args.seed).items():
        f32 = (args.work if "F32" in FILES[name] else scratch) / f"{name}.gguf"
        L.write_llama(f32, tensors)
        for kind in (k for k in FILES[name] if k != "F32"):
            out = args.work / f"{name}-{kind.lower()}.gguf"
            subprocess.run([str(args.quantize), str(f32), str(out), kind], check=True, capture_output=True)
        if f32.parent == scratch:
            f32.unlink()
    scratch.rmdir()
    print("\n".join(sorted(p.name for p in args.work.iterdir())))


if __name__ == "__main__":
    main()

"""Peak memory and time of reading (dequantizing) and matching (``requantized_match``'s code count) one
bitsandbytes or MLX layer of a realistic size, on random stored parts (session 29: docs/benchmarks.md).

Each case runs in a process of its own (``--case``): the peak is the resident set's high-water mark above what
the inputs hold (reset through ``/proc/self/clear_refs``, Linux), the time the best of five runs.
``python bench/quantized_memory.py`` runs every case at 4096 x 4096 and 4096 x 11008 on one torch thread, a
minute or two on 2 cores.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import json
import subprocess
import sys
import time

CASES = ("bnb4-read", "bnb4-match", "bnb8-read", "bnb8-match", "mlx4-read", "mlx4-match", "mlx3-read", "mlx3-match")


def rss(field: str) -> int:
    """A ``/proc/self/status`` size (``VmRSS:``, ``VmHWM:``) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def make_case(case: str, rows: int, cols: int):
    """The function a case times, on random stored parts of a (rows, cols) layer and a float32 source."""
    import torch

    from modelatlas.weights import bnb as B
    from modelatlas.weights import mlx_affine as M

    g = torch.Generator().manual_seed(0)
    x, n, book = torch.randn(rows, cols, generator=g), rows * cols, torch.linspace(-1, 1, 16)
    if case.startswith("bnb4"):
        packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, generator=g)
        parts = {"absmax": torch.randint(0, 256, (n // 64,), dtype=torch.uint8, generator=g),
                 "nested_absmax": torch.rand(-(-n // 64 // 256), generator=g), "nested_quant_map": torch.linspace(-1, 1, 256)}
        state = {"shape": [rows, cols], "blocksize": 64, "nested_blocksize": 256, "nested_offset": 0.05}
        if case.endswith("match"):
            return lambda: B.requantized_share_4bit(x, packed, book, 64)
        return lambda: B.dequantize_4bit(packed, B.block_absmax(parts, {r: r for r in parts}, state), book, state)
    if case.startswith("bnb8"):
        w8, scb = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g), torch.rand(rows, generator=g)
        return (lambda: B.requantized_share_int8(x, w8)) if case.endswith("match") else (lambda: B.dequantize_int8(w8, scb))
    bits = int(case[3])
    words = torch.randint(0, 2**32, (rows, cols * bits // 32), dtype=torch.int64, generator=g).to(torch.uint32)
    scales, biases = (torch.rand(rows, cols // 64, generator=g).bfloat16() for _ in range(2))
    if case.endswith("match"):
        return lambda: M.requantized_share(x, words, bits, 64)
    return lambda: M.dequantize(words, scales, biases, bits, 64)


def run_case(case: str, rows: int, cols: int) -> dict:
    """One case's peak above its inputs (MiB) and best time of five (s)."""
    import torch

    torch.set_num_threads(1)
    fn = make_case(case, rows, cols)
    fn()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = rss("VmRSS:")
    out = fn()
    peak, best = rss("VmHWM:") - base, float("inf")
    del out
    for _ in range(5):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return {"case": case, "shape": f"{rows} x {cols}", "peak_MiB": round(peak / 2**20), "seconds": round(best, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=CASES)
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 4096])
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, *args.shape)))
        return
    print("| case | layer | peak MiB above inputs | seconds (1 thread) |\n|---|---|---|---|")
    for shape in ((4096, 4096), (4096, 11008)):
        for case in CASES:
            got = subprocess.run([sys.executable, __file__, "--case", case, "--shape", *map(str, shape)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(got.stdout)
            print(f"| {r['case']} | {r['shape']} | {r['peak_MiB']} | {r['seconds']} |")


if __name__ == "__main__":
    main()

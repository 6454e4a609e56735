"""Reading one tensor over HTTP on loopback: seconds for the whole tensor and for 64 rows spaced across it
(docs/benchmarks.md, "Session 38: HTTP bodies read as their bytes come").

    python bench/http_read.py --work /tmp/http_read --width 4096 --repeats 12

writes (once) ``a.safetensors`` holding one width x width float32 tensor (64 MiB at 4096), serves its folder from
127.0.0.1 (bench/lineage_remote.py's server: ``Range`` requests, HTTP/1.1) and prints the best of ``--repeats``
reads of the tensor and of rows 0, w/64, 2w/64, ... (one request: they are under 1 MiB apart). The file stays in
the page cache: this times the client's handling of the bytes (buffers, copies), not a network. ``--ranges N``
also times N requests of 4 KiB (one kept connection; the median of 7 runs, microseconds a request): what a
request costs the client beside its bytes (docs/benchmarks.md, "Session 38: bytes past an answer's end").
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import statistics
import time
from pathlib import Path

import torch
from lineage_remote import serve
from safetensors.torch import save_file

from modelatlas.weights import open_checkpoint
from modelatlas.weights.http_ranges import HttpRanges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--ranges", type=int, default=0, help="also time this many 4 KiB requests, 7 times")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    file = args.work / "a.safetensors"
    if not file.is_file():
        save_file({"t": torch.randn(args.width, args.width, generator=torch.Generator().manual_seed(0))}, str(file))
    srv = serve(args.work)
    rows = torch.arange(0, args.width, max(args.width // 64, 1))
    whole, spaced = [], []
    with open_checkpoint(f"http://127.0.0.1:{srv.server_port}/a.safetensors") as ck:
        for _ in range(args.repeats):
            start = time.perf_counter()
            ck.read("t")
            whole.append(time.perf_counter() - start)
            start = time.perf_counter()
            ck.read_rows("t", rows)
            spaced.append(time.perf_counter() - start)
    if args.ranges:
        print(f"4 KiB ranges: {small_ranges(f'http://127.0.0.1:{srv.server_port}/a.safetensors', args.ranges)}")
    srv.shutdown()
    print(f"tensor {file.stat().st_size / 1e6:.1f} MB: {min(whole):.3f} s; {len(rows)} rows: {min(spaced):.3f} s "
          f"(best of {args.repeats})")


def small_ranges(url: str, n: int) -> str:
    """Microseconds a 4 KiB request takes on one kept connection: median (min) of 7 runs of ``n``."""
    ranges, runs = HttpRanges(url), []
    ranges.fetch(0, 8, "the header length")  # (the connection opened)
    for _ in range(7):
        start = time.perf_counter()
        for i in range(n):
            ranges.fetch(8 * i % (ranges.size - 4096), 4096, "a range")
        runs.append((time.perf_counter() - start) / n * 1e6)
    return f"median {statistics.median(runs):.0f} us a request (min {min(runs):.0f}; 7 runs of {n})"


if __name__ == "__main__":
    main()

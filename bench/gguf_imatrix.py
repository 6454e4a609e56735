"""How close is ``GGUFCheckpoint.rounding_variance`` to the real rounding error of llama-quantize's output, with
and without an importance matrix (``--imatrix``)?

    python bench/gguf_imatrix.py --quantize /tmp/llcpp/.../build/bin/llama-quantize --work /tmp/imx --seeds 0,1

The tiny llama model of ``bench/lineage_llamacpp.py`` (t(5) or Gaussian weights) is quantized by llama-quantize
to every --types, plainly and with an importance matrix written here (:func:`write_imatrix`: per input column a
log-normal activation energy, sigma 1.5, and 1 % outlier channels 10-100x, as LLM activations' second moments
are spread). Printed per ggml type of the quantized tensors (a K_M mix holds several): the real summed squared
error over the estimated summed variance (real / est), and the same ratio on the 10 % most and least important
columns (top / bottom: how far the imatrix moves the error between columns).
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import lineage_llamacpp as L  # noqa: E402  (the model and its F32 writer)

from modelatlas.weights import open_checkpoint  # noqa: E402

TYPES = "Q8_0,Q5_1,Q5_0,Q4_1,Q4_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K,IQ4_XS,IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,IQ2_XXS,IQ1_M,IQ1_S"
NEEDS_IMATRIX = {"IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"}  # llama-quantize refuses without


def make_importance(rng: np.random.Generator, n: int, sigma: float = 1.5) -> np.ndarray:
    """(n,) activation second moments: log-normal, 1 % of the channels 10-100x more."""
    x = np.exp(sigma * rng.standard_normal(n))
    out = rng.random(n) < 0.01
    x[out] *= 10 ** rng.uniform(1, 2, out.sum())
    return x.astype(np.float32)


def write_imatrix(path: Path, importance: dict[str, np.ndarray], chunks: int = 100) -> None:
    """llama.cpp's legacy ``.dat`` importance matrix (common/imatrix-loader.cpp): entries of name, calls and
    sums (mean energy x calls), then the chunk count and the data set's name."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(importance)))
        for name, x in importance.items():
            f.write(struct.pack("<i", len(name.encode())) + name.encode())
            f.write(struct.pack("<ii", chunks, len(x)) + (x * chunks).astype("<f4").tobytes())
        f.write(struct.pack("<i", chunks) + struct.pack("<i", 9) + b"synthetic")


def quantize(binary: Path, src: Path, out: Path, kind: str, imatrix: Path | None, flags: tuple[str, ...] = ()) -> bool:
    """llama-quantize ``src`` to ``out`` as ``kind`` (``flags``: more options, "--pure"); True when it succeeded."""
    cmd = [str(binary), *flags] + (["--imatrix", str(imatrix)] if imatrix else []) + [str(src), str(out), kind]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def quantize_random(binary: Path, src: Path, out: Path, kind: str, tensors: dict[str, np.ndarray],
                    rng: np.random.Generator, flags: tuple[str, ...] = ()) -> bool:
    """:func:`quantize` with an importance matrix of :func:`make_importance` for each matrix of ``tensors``
    (``src``'s), written beside ``out`` and removed after (bench/lineage_iq.py, bench/lineage_kquant_tree.py)."""
    imx = out.with_suffix(".imatrix")
    write_imatrix(imx, {k: make_importance(rng, v.shape[1]) for k, v in tensors.items() if v.ndim == 2})
    try:
        return quantize(binary, src, out, kind, imx, flags)
    finally:
        imx.unlink()


def tensor_rows(path: Path, weights: dict[str, np.ndarray], importance: dict[str, np.ndarray]):
    """(ggml type, real squared error (R, m), estimated variance (R, m) or None, importance (m,)) per tensor."""
    with open_checkpoint(path) as q:
        for t in q.tensors():
            kind = q.quantization(t.name)
            if kind is None or t.name not in weights:
                continue
            have = q.read(t.name)
            real = (have.double().numpy() - weights[t.name]) ** 2
            est = q.rounding_variance(t.name, have)
            yield kind, real, None if est is None else est.double().numpy(), importance.get(t.name)


def add(acc: dict, kind: str, real: np.ndarray, est: np.ndarray | None, imp: np.ndarray | None) -> None:
    a = acc[kind]
    a["real"] += real.sum()
    a["est"] += np.nan if est is None else est.sum()
    if imp is not None and est is not None:
        order = np.argsort(imp)
        k = max(1, len(order) // 10)
        for side, cols in (("bottom", order[:k]), ("top", order[-k:])):
            a[side + "_real"] += real[:, cols].sum()
            a[side + "_est"] += est[:, cols].sum()


def run(args, seed: int, dist: str, acc: dict) -> None:
    rng = np.random.default_rng(seed)
    weights = L.make_weights(rng)
    if dist == "gauss":
        weights = {k: (v.std() * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2 else v
                   for k, v in weights.items()}
    src = args.work / f"s{seed}-{dist}.gguf"
    L.write_llama(src, weights)
    importance = {k: make_importance(rng, v.shape[1], args.sigma) for k, v in weights.items() if v.ndim == 2}
    imx = args.work / f"s{seed}-{dist}.imatrix"
    write_imatrix(imx, importance)
    for kind in args.types.split(","):
        for use in (False, True):
            if kind in NEEDS_IMATRIX and not use:
                continue
            out = args.work / f"s{seed}-{dist}-{kind.lower()}{'-imx' if use else ''}.gguf"
            if not quantize(args.quantize, src, out, kind, imx if use else None):
                print(f"llama-quantize failed: {out.name}", file=sys.stderr)
                continue
            for t_kind, real, est, imp in tensor_rows(out, weights, importance if use else {}):
                add(acc[("imatrix" if use else "plain", dist)], t_kind, real, est, imp if use else None)


def report(acc: dict) -> None:
    print("| ggml type | weights | imatrix | real / est | top 10 % columns | bottom 10 % |")
    print("|---|---|---|---|---|---|")
    for (use, dist), per in sorted(acc.items()):
        for kind, a in sorted(per.items()):
            cols = (f"{a['top_real'] / a['top_est']:.3f} | {a['bottom_real'] / a['bottom_est']:.3f}"
                    if a.get("top_est") else "- | -")
            print(f"| {kind} | {dist} | {use} | {a['real'] / a['est']:.3f} | {cols} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", type=Path, required=True, help="llama.cpp's llama-quantize binary")
    ap.add_argument("--work", type=Path, required=True, help="new folder for the GGUF files")
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--dists", default="t5,gauss")
    ap.add_argument("--sigma", type=float, default=1.5, help="log-normal spread of the column importances")
    args = ap.parse_args()
    args.work.mkdir(parents=True)
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    for seed in (int(s) for s in args.seeds.split(",")):
        for dist in args.dists.split(","):
            run(args, seed, dist, acc)
    report(acc)


if __name__ == "__main__":
    main()

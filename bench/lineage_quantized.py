"""Are GGUF quantizations of trained models found as copies, and nothing else? Do they stand in for their
models when those are not given? (``lineage.quantized``, ``lineage.rounding``)

    python bench/lineage.py --suite heldout --work /tmp/zoos          # (any suites; it builds the zoos)
    python bench/lineage_quantized.py /tmp/zoos/* --seed 0 --work /tmp/quantized
    python bench/lineage_quantized.py /tmp/zoos/* --seed 0 --work /tmp/standins --replace --kinds Q4_0

For every zoo folder (one holding a manifest.json), the models are copied into one folder of ``.safetensors``
files and a seeded ``--share`` of them (a third) is also written as a GGUF file quantized to Q8_0, Q4_0 or
Q5_1 (``--kinds``; the types ``gguf`` can write; layers whose rows are not a multiple of 32 stay float32).
``--replace``: those models are there only as GGUF files (no source file), a seeded half of them in two types,
as in a folder of downloaded GGUF files; each is scored as its first file. Lineage is recovered over the
folder. Printed per zoo: quantized files written; found as copies of their own source (with ``--replace``:
of the other rounding of their model); found as a copy of another model; placed as models of their own
(stand-ins); missed; false copies (a full-precision model called a copy); directed-edge accuracy on the
zoo's edges, and without the GGUF files; then the wrong edges by kind and the pooled count. K-quant copies
need llama.cpp's quantizer: ``--quantize .../llama-quantize`` writes any of its types (``--kinds Q4_K_M,IQ2_XS``;
the zoos' rows of 32 or 64 values fall back to 32-value types: Q4_K -> Q5_0, Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0,
IQ1-IQ3 / IQ4_XS -> IQ4_NL), ``--imatrix random`` with an importance matrix per file (log-normal column
energies, ``bench/gguf_imatrix.py``), as most downloaded GGUF files are made. Layers that are not 2-D or whose
rows are not a multiple of 32 stay float32 there too.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import gguf_imatrix as G  # noqa: E402  (the importance matrix writer)

from modelatlas.lineage import recover_lineage  # noqa: E402
from modelatlas.lineage.scoring import edge_errors, score_forest  # noqa: E402
from modelatlas.zoo.gguf import quantized, save_gguf  # noqa: E402
from modelatlas.zoo.manifest import load_manifest  # noqa: E402

KINDS = ("Q8_0", "Q4_0", "Q5_1")


def write_gguf(source: Path, path: Path, kind: str) -> None:
    """The tensors of ``source`` (safetensors) as a GGUF file, 2-D rows of 32k values quantized to ``kind``."""
    tensors = {name: t.float().numpy() for name, t in load_file(str(source)).items()}
    save_gguf(path, {name: quantized(x, kind) if x.ndim == 2 and x.shape[1] % 32 == 0 else x
                     for name, x in tensors.items()})


def more_bits(names: list[str], kind: str) -> set[str]:
    """The 2-D tensors (``names`` in file order) that llama-quantize's ``kind`` would give Q6_K were they named
    as llama's: for Q3_K_M / Q4_K_M / Q5_K_M the output (the zoos' classifier, else the last) and, of the rest,
    those ``use_more_bits(i, n)`` picks for attn_v / ffn_down (the first n/8, the last n/8, every third from
    n/8 + 2, C integer division); none for other kinds. The zoos' names match none of llama's, so without it
    llama-quantize types every matrix alike."""
    if not kind.endswith("_K_M") or not names:
        return set()
    output = next((m for m in names if m.startswith("classifier")), names[-1])
    rest = [m for m in names if m != output]
    n = len(rest)
    return {output} | {m for i, m in enumerate(rest) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}


def write_llamacpp(source: Path, path: Path, kind: str, binary: Path, rng: np.random.Generator | None,
                   emulate: bool = False) -> None:
    """``source`` quantized by llama-quantize to ``kind`` (an F32 llama-architecture file first), with a random
    importance matrix (:func:`gguf_imatrix.make_importance`) when ``rng`` is given; tensors that are not 2-D
    or whose rows are not a multiple of 32 kept as float32 (``--tensor-type NAME=f32``). ``emulate``: the
    matrices :func:`more_bits` names get Q8_0 (Q6_K's type for rows of 32-64), as a K_M file's are typed."""
    from lineage_llamacpp import write_llama  # bench/lineage_llamacpp.py

    tensors = {k: v.float().numpy() for k, v in load_file(str(source)).items()}
    f32, imx = path.with_suffix(".f32.tmp"), path.with_suffix(".imatrix.tmp")
    write_llama(f32, tensors, embed=64, blocks=1, ff=64, heads=1, vocab=8)
    cmd = [str(binary)]
    flat = [name for name, x in tensors.items() if x.ndim == 2 and x.shape[1] % 32 == 0]
    wider = more_bits(flat, kind) if emulate else set()
    for name in tensors:
        if name not in flat or name in wider:
            cmd += ["--tensor-type", "^" + name.replace(".", "\\.") + ("$=q8_0" if name in wider else "$=f32")]
    if rng is not None:
        G.write_imatrix(imx, {k: G.make_importance(rng, x.shape[1]) for k, x in tensors.items() if x.ndim == 2})
        cmd += ["--imatrix", str(imx)]
    subprocess.run(cmd + [str(f32), str(path), kind], check=True, capture_output=True)
    f32.unlink()
    imx.unlink(missing_ok=True)


def make_folder(zoo: Path, out: Path, rng: np.random.Generator, replace: bool = False,
                kinds: tuple[str, ...] = KINDS, share: float = 1 / 3, write=write_gguf) -> dict[str, list[str]]:
    """The zoo's models as files in ``out`` plus quantized copies of a third; returns source -> its copies.
    ``replace``: the chosen ones (a ``share`` of the models) are there only quantized (no source file), a seeded half of it twice (two
    types), as a folder of downloaded GGUF files holds them."""
    manifest = load_manifest(zoo / "manifest.json")
    out.mkdir(parents=True)
    copies: dict[str, list[str]] = {}
    for m in manifest.models:
        src = manifest.path_of(m.name) / "model.safetensors"
        chosen = rng.random() < share
        if not (chosen and replace):
            shutil.copy(src, out / f"{m.name}.safetensors")
        if chosen:
            n = 1 + int(replace and rng.random() < 0.5)
            for kind in rng.choice(kinds, min(n, len(kinds)), replace=False):
                write(src, out / f"{m.name}-{kind.lower()}.gguf", kind)
                copies.setdefault(m.name, []).append(f"{m.name}-{kind.lower()}")
    return copies


def zoo_row(zoo: Path, work: Path, rng: np.random.Generator, replace: bool = False,
            kinds: tuple[str, ...] = KINDS, share: float = 1 / 3, write=write_gguf) -> dict:
    manifest = load_manifest(zoo / "manifest.json")
    copies = make_folder(zoo, work / zoo.name, rng, replace, kinds, share, write)
    plain = recover_lineage([manifest.path_of(m.name) for m in manifest.models])
    start = time.perf_counter()
    forest = recover_lineage(sorted((work / zoo.name).iterdir()))
    secs = time.perf_counter() - start
    found = {e.child: e.parent for e in forest.edges if e.kind == "precision"}
    source = {c: s for s, cs in copies.items() for c in cs}
    truth = manifest.parents()
    if replace:  # each replaced model is scored as its first copy, the edges of the others are not counted
        first = {s: cs[0] for s, cs in copies.items()}
        truth = {first.get(c, c): None if p is None else first.get(p, p) for c, p in truth.items()}
    quantized = forest.decisions.get("quantized_models", {})
    score = score_forest(forest, truth)
    own = {c for c, s in source.items() if c in found and s in (found[c], source.get(found[c]))}  # or its twin
    return {"zoo": zoo.name, "written": len(source), "own": len(own),
            "other": sum(c in found and c not in own for c in source),
            "missed": sum(c not in found and c not in quantized for c in source), "false": sum(c not in source for c in found),
            "stand-in": sum(c in quantized for c in source),
            "acc": score.directed, "acc_plain": score_forest(plain, manifest).directed,
            "seconds": secs, "forest": forest, "truth": truth, "right": score.n_correct, "n": score.n_true_edges}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="new folder for the mixed model folders")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replace", action="store_true",
                    help="the quantized third stands in for its models (source files not written; half of them "
                         "in two types)")
    ap.add_argument("--share", type=float, default=1 / 3, help="share of the models quantized (default 1/3)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"comma-separated types among {', '.join(KINDS)}; with --quantize, llama-quantize's")
    ap.add_argument("--quantize", type=Path, help="llama.cpp's llama-quantize binary: it writes every file")
    ap.add_argument("--more-bits", action="store_true",
                    help="K_M kinds: the classifier and use_more_bits' matrices as Q8_0 (Q6_K's fallback), as "
                         "llama-quantize types llama's output / attn_v / ffn_down (needs --quantize)")
    ap.add_argument("--imatrix", choices=("none", "random"), default="none",
                    help="random: llama-quantize --imatrix with random column importances (needs --quantize)")
    args = ap.parse_args()
    kinds = tuple(k.strip().upper() for k in args.kinds.split(","))
    if not kinds or (args.quantize is None and any(k not in KINDS for k in kinds)):
        ap.error(f"--kinds {args.kinds!r}: give types among {', '.join(KINDS)} (or --quantize)")
    if args.imatrix != "none" and args.quantize is None:
        ap.error("--imatrix needs --quantize")
    rng = np.random.default_rng(args.seed)
    write = write_gguf
    if args.quantize is not None:
        imx_rng = np.random.default_rng(args.seed + 1) if args.imatrix == "random" else None

        def write(src: Path, path: Path, kind: str) -> None:
            write_llamacpp(src, path, kind, args.quantize, imx_rng, args.more_bits)

    rows = [zoo_row(z, args.work, rng, args.replace, kinds, args.share, write) for z in args.zoos
            if (z / "manifest.json").is_file()]
    print("| zoo | GGUF files | found (own source) | another model | stand-in | missed | false copies | "
          "directed (without GGUF) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['zoo']} | {r['written']} | {r['own']} | {r['other']} | {r['stand-in']} | {r['missed']} | "
              f"{r['false']} | {100 * r['acc']:.1f}% ({100 * r['acc_plain']:.1f}%) | {r['seconds']:.2f} |")
    total = {k: sum(r[k] for r in rows) for k in ("written", "own", "other", "stand-in", "missed", "false")}
    print(f"\nall: {total}")
    errors = Counter(k for r in rows for k in edge_errors(r["forest"], r["truth"]).values())
    print(f"wrong edges by kind: {dict(errors)}; pooled directed {sum(r['right'] for r in rows)}/"
          f"{sum(r['n'] for r in rows)}")


if __name__ == "__main__":
    main()

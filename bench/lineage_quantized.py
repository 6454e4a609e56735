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
need llama.cpp's quantizer (``bench/lineage_llamacpp.py``); tests/weights/test_gguf_grid.py covers their grid.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.scoring import edge_errors, score_forest
from modelatlas.zoo.manifest import load_manifest

KINDS = ("Q8_0", "Q4_0", "Q5_1")


def write_gguf(source: Path, path: Path, kind: str) -> None:
    """The tensors of ``source`` (safetensors) as a GGUF file, 2-D rows of 32k values quantized to ``kind``."""
    import gguf

    t = gguf.GGMLQuantizationType[kind]
    w = gguf.GGUFWriter(str(path), "llama")
    for name, tensor in load_file(str(source)).items():
        x = tensor.float().numpy()
        if x.ndim == 2 and x.shape[1] % 32 == 0:
            q = gguf.quants.quantize(x, t)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_folder(zoo: Path, out: Path, rng: np.random.Generator, replace: bool = False,
                kinds: tuple[str, ...] = KINDS, share: float = 1 / 3) -> dict[str, list[str]]:
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
                write_gguf(src, out / f"{m.name}-{kind.lower()}.gguf", kind)
                copies.setdefault(m.name, []).append(f"{m.name}-{kind.lower()}")
    return copies


def zoo_row(zoo: Path, work: Path, rng: np.random.Generator, replace: bool = False,
            kinds: tuple[str, ...] = KINDS, share: float = 1 / 3) -> dict:
    manifest = load_manifest(zoo / "manifest.json")
    copies = make_folder(zoo, work / zoo.name, rng, replace, kinds, share)
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
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated types among {', '.join(KINDS)}")
    args = ap.parse_args()
    kinds = tuple(k.strip().upper() for k in args.kinds.split(","))
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds {args.kinds!r}: give types among {', '.join(KINDS)}")
    rng = np.random.default_rng(args.seed)
    rows = [zoo_row(z, args.work, rng, args.replace, kinds, args.share) for z in args.zoos if (z / "manifest.json").is_file()]
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

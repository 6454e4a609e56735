"""Lineage benchmark: accuracy and wall time of `recover_lineage` on trained zoos with known lineage.

    python bench/lineage.py --suite accuracy --work /tmp/atlas-bench-lineage
    python bench/lineage.py --suite scaling --work /tmp/atlas-bench-lineage
    python bench/lineage.py --suite wide --work /tmp/atlas-bench-lineage --only "wide512 39"
    python bench/lineage.py --synthetic-wide 512 --work /tmp/atlas-bench-lineage

accuracy: 3 trees x 3 children x depth 2 (39 models) zoos the method was not tuned on (seed 0 MLP/digits
zoos were used during development): other seeds, a CNN, a ViT, a wider MLP, another dataset, full fine-tuning
and LoRA (rank 4, and mixed ranks 2/4/8). Each zoo: ours (K, stage, distance all found from the weights) vs
the published MoTHer recipe told the true K and the right stage (the majority kurtosis direction of the true
edges), with its own distance for the split (RMS for full fine-tuning, rank for LoRA).
scaling: full fine-tuning MLP zoos of 21 to 200 models; wall time of recovery next to the time to read every
tensor of every checkpoint once (the floor), warm page cache for both.
Zoos are built once under --work (resumable) and reused. Prints a Markdown table; --json saves the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from modelatlas.errors import ConfigError
from modelatlas.lineage import recover_lineage
from modelatlas.lineage.scoring import edge_marks, score_forest
from modelatlas.weights import open_checkpoint
from modelatlas.zoo import make_zoo, preset

ACCURACY = {
    "full mlp seed1": ("lineage-full", dict(seed=1)),
    "full mlp seed2": ("lineage-full", dict(seed=2)),
    "full mlp-wide seed3": ("lineage-full", dict(seed=3, arch_kwargs={"hidden": 128, "n_hidden": 2})),
    "full cnn seed1": ("lineage-full", dict(seed=1, arch="cnn")),
    "full vit seed1": ("lineage-full", dict(seed=1, arch="vit", root_steps=(300, 400), root_lr=(1e-3, 3e-3))),
    "full mlp mnist5k seed1": ("lineage-full", dict(seed=1, dataset="mnist5k")),
    "full mlp fashion-mnist seed1": ("lineage-full", dict(seed=1, dataset="fashion-mnist")),
    "lora r4 mlp seed1": ("lineage-lora", dict(seed=1)),
    "lora r4 mlp seed2": ("lineage-lora", dict(seed=2)),
    "lora r2/4/8 mlp seed1": ("lineage-lora-mixed", dict(seed=1)),
    "lora r4 cnn seed1": ("lineage-lora", dict(seed=1, arch="cnn")),
    "mixed mlp seed1": ("demo", dict(seed=1, children=3)),
    # fresh zoos, first run after the last design change (nuclear x rank distance)
    "fresh: full mlp seed4": ("lineage-full", dict(seed=4)),
    "fresh: full cnn seed5": ("lineage-full", dict(seed=5, arch="cnn")),
    "fresh: full vit seed6": ("lineage-full", dict(seed=6, arch="vit", root_steps=(300, 400), root_lr=(1e-3, 3e-3))),
    "fresh: lora r8 vit seed4": ("lineage-lora", dict(seed=4, arch="vit", lora_ranks=(8,))),
    "fresh: mixed cnn seed4": ("demo", dict(seed=4, children=3, arch="cnn")),
}
SCALING = {n: ("lineage-full", dict(seed=10, trees=t, children=c, depth=d))
           for n, (t, c, d) in {21: (3, 2, 2), 39: (3, 3, 2), 78: (6, 3, 2), 120: (3, 3, 3), 200: (5, 3, 3)}.items()}
# wider models (3 square 512 x 512 layers, 3.3 MB files) so that reading is not free next to fixed compute
WIDE = {f"wide512 {n}": ("lineage-full", dict(seed=11, trees=t, children=c, depth=d,
                                              arch_kwargs={"hidden": 512, "n_hidden": 3}))
        for n, (t, c, d) in {39: (3, 3, 2), 78: (6, 3, 2), 200: (5, 3, 3)}.items()}


def build(work: Path, key: str, name: str, overrides: dict):
    folder = work / key.replace(" ", "_").replace("/", "-")
    t = time.perf_counter()
    try:
        manifest = make_zoo(preset(name, **overrides), folder, workers=2)
    except ConfigError:  # built by another version of the zoo code: rebuild
        manifest = make_zoo(preset(name, **overrides), folder, workers=2, resume=False)
    return manifest, time.perf_counter() - t


def read_floor(paths: list[Path]) -> float:
    """Seconds to open every checkpoint and read every tensor once."""
    t = time.perf_counter()
    for p in paths:
        with open_checkpoint(p) as ck:
            for name in ck.keys():
                ck.read(name)
    return time.perf_counter() - t


def right_stage(forest, manifest) -> str:
    k = forest.kurtosis
    rising = np.mean([k[c] > k[p] for p, c in manifest.edges()])
    return "generalize" if rising > 0.5 else "specialize"


def evaluate(manifest, paper_distance: str) -> dict:
    paths = [manifest.path_of(n) for n in manifest.names]
    floor = read_floor(paths)
    t = time.perf_counter()
    ours = recover_lineage(paths)
    t_ours = time.perf_counter() - t
    stage = right_stage(ours, manifest)
    k = len({m.tree for m in manifest.models})
    t = time.perf_counter()
    paper = recover_lineage(paths, method="mother-paper", n_trees=k, stage=stage, distance=paper_distance)
    t_paper = time.perf_counter() - t
    s_ours, s_paper = score_forest(ours, manifest), score_forest(paper, manifest)
    marks = edge_marks(ours, manifest)
    right = [e.score for e in ours.edges if marks[(e.parent, e.child)] == "right"]
    wrong = [e.score for e in ours.edges if marks[(e.parent, e.child)] != "right"]
    d = ours.decisions
    return {"models": len(paths), "ours": s_ours.as_dict(), "paper": s_paper.as_dict(), "t_read": floor,
            "t_ours": t_ours, "t_paper": t_paper, "right_stage": stage, "stage": d["stage"],
            "stage_conf": d["stage_confidence"], "k_found": d["n_trees"], "k_true": k, "distance": d["distance"],
            "score_right": float(np.mean(right)) if right else None,
            "score_wrong": float(np.mean(wrong)) if wrong else None}


def synthetic_wide(work: Path, n_models: int, dim: int) -> dict:
    """Timing at width ``dim`` without training: a synthetic forest (5 trees x 3 children, depth 3 = 200
    models; 3 heavy-tailed dim x dim layers each) written as safetensors, read floor vs recovery with exact
    (``distance_sketch=None``) and sketched (default) distances; accuracy from the known parents."""
    from safetensors.torch import save_file

    from modelatlas.lineage.synthetic import make_synthetic_forest
    depth = {39: 2, 200: 3}[n_models]
    trees = {39: 3, 200: 5}[n_models]
    folder = work / f"synthetic-wide{dim}-{n_models}"
    weights, parents = make_synthetic_forest(trees, 3, depth, dim, step=0.02, seed=12, layers=("l0", "l1", "l2"))
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in weights.items():
        if not (folder / f"{name}.safetensors").exists():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))
    paths = [folder / f"{n}.safetensors" for n in weights]
    read_floor(paths)  # warm the page cache
    out = {"models": len(paths), "t_read": read_floor(paths)}
    for key, kw in (("sketched", {}), ("exact", {"distance_sketch": None})):
        t = time.perf_counter()
        f = recover_lineage(paths, **kw)
        out[f"t_{key}"] = time.perf_counter() - t
        got = {(e.parent, e.child) for e in f.edges}
        true = {(p, c) for c, p in parents.items() if p is not None}
        out[f"directed_{key}"] = len(got & true) / len(true)
        out[f"undirected_{key}"] = len({frozenset(e) for e in got} & {frozenset(e) for e in true}) / len(true)
    return out


def row(key: str, r: dict) -> str:
    o, p = r["ours"], r["paper"]
    sw = "-" if r["score_wrong"] is None else f"{r['score_wrong']:.2f}"
    return (f"| {key} | {r['models']} | **{o['directed_accuracy']:.1%}** / {o['undirected_accuracy']:.1%} / "
            f"{o['ari']:.2f} | {p['directed_accuracy']:.1%} / {p['undirected_accuracy']:.1%} / {p['ari']:.2f} | "
            f"{r['k_found']}/{r['k_true']} | {r['stage']} ({r['stage_conf']:.2f}; right: {r['right_stage']}) | "
            f"{r['distance']} | {r['score_right']:.2f} / {sw} | {r['t_read']:.2f} | {r['t_ours']:.2f} | "
            f"{r['t_ours'] / max(r['t_read'], 1e-9):.1f}x |")


HEADER = ("| zoo | models | ours: directed / undirected / ARI | MoTHer recipe (true K, right stage) | K found/true "
          "| stage found (confidence) | distance | mean score right / wrong edges | read s | ours s | ours/read |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("accuracy", "scaling", "wide"), default="accuracy")
    ap.add_argument("--work", type=Path, default=Path("/tmp/atlas-bench-lineage"))
    ap.add_argument("--only", help="comma-separated zoo keys")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--synthetic-wide", type=int, metavar="DIM", help="synthetic timing rows at this width")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.synthetic_wide:
        for n in (39, 200):
            print(n, json.dumps(synthetic_wide(args.work, n, args.synthetic_wide)), flush=True)
        return
    zoos = {"accuracy": ACCURACY, "scaling": SCALING, "wide": WIDE}[args.suite]
    keys = [k for k in zoos if not args.only or str(k) in args.only.split(",")]
    rows = {}
    print(HEADER, flush=True)
    for key in keys:
        name, overrides = zoos[key]
        manifest, t_build = build(args.work, str(key), name, overrides)
        method = manifest.config.get("method", "full")
        r = evaluate(manifest, "rank" if method == "lora" else "l2")
        r["t_build"] = t_build
        rows[str(key)] = r
        print(row(str(key), r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

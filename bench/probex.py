"""ProbeX benchmark: Task A (training-class sets, within / pooled / routed trees) and Task B (weights <->
language, zero-shot and text search) on zoos built by :mod:`modelatlas.probex.families`.

    python bench/probex.py --zoo /tmp/probex_zoo [--epochs 100] [--rank 16] [--write]

Builds the zoos once (cached under --zoo), trains every expert on 1 thread, prints the tables and with
--write replaces the "## ProbeX" section of docs/benchmarks.md.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modelatlas.allocator import keep_freed_memory
from modelatlas.probex import (
    DenseExpert,
    ProbeXClassifier,
    ProbeXConfig,
    ProbeXTextAligner,
    StatNNClassifier,
    TreeRouter,
    load_layers,
)
from modelatlas.probex.families import (
    LAYERS,
    make_class_subset_zoo,
    make_named_class_zoo,
    named_classes,
    prompt,
)
from modelatlas.probex.router import cluster_trees
from modelatlas.weights import open_checkpoint

WEIGHTS = [f"{name}.weight" for name in LAYERS]
ALL = [f"{name}.{kind}" for name in LAYERS for kind in ("weight", "bias")]


def split(n: int, seed: int, test: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = int(n * test)
    return perm[k:], perm[:k]


def metrics(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(mean per-label accuracy, exact-set accuracy)."""
    return float((pred == y).mean()), float((pred == y).all(1).mean())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def warm_up() -> None:
    """One tiny fit of each Task A estimator, so that one-off costs (torch.optim's first step imports
    torch._dynamo, StatNN imports scikit-learn: ~2-3 s each) are not charged to the first timed row."""
    x, y = torch.randn(4, 8, 8), np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    cfg = ProbeXConfig(epochs=1, rank_u=2, rank_v=2, rank_t=2)
    ProbeXClassifier(cfg, "w").fit(x, y)
    DenseExpert(cfg, "w").fit(x, y)
    StatNNClassifier().fit({"w": x}, y)


def load_task_a(zoo: Path, seed: int):
    return trees_of(make_class_subset_zoo(zoo / "classes_deep", intermediates=20, seed=seed), seed)


def trees_of(manifest, seed: int, names: list[str] | None = None) -> dict:
    """Per tree: every tensor of its class-subset children (read once), multi-hot targets, a train/test split."""
    trees: dict[str, dict] = {}
    for tree in sorted({m.tree for m in manifest.models}):
        recs = [m for m in manifest.models if m.tree == tree and m.parent is not None and "classes" in m.task]
        if not recs:
            continue
        paths = [manifest.root / m.path for m in recs]
        if names is None:
            with open_checkpoint(paths[0]) as ckpt:
                names = [t.name for t in ckpt.tensors()]
        layers = load_layers(paths, names, matrices=False)
        y = np.zeros((len(recs), 1 + max(c for m in recs for c in m.task["classes"])), dtype=np.float32)
        for i, m in enumerate(recs):
            y[i, m.task["classes"]] = 1
        train, test = split(len(recs), seed)
        trees[tree] = {"layers": layers, "y": y, "train": train, "test": test}
    return trees


def external(manifest_path: str, cfg: ProbeXConfig, out: list[str]) -> None:
    """Task A within the largest tree of a zoo built elsewhere (e.g. `atlas zoo make --preset probex-digits`)."""
    from modelatlas.zoo.manifest import load_manifest

    trees, sec = timed(lambda: trees_of(load_manifest(manifest_path), cfg.seed))
    main = max(trees, key=lambda t: len(trees[t]["y"]))
    d = trees[main]
    weights = [k for k, v in d["layers"].items() if v.ndim == 3]
    out += [f"### Task A on a zoo ProbeX was not tuned on: `{manifest_path}`", "",
            f"Built by the zoo module (`atlas zoo make --preset probex-digits`: MLP 64-64x3-10, 1 root x 1,000 "
            f"full fine-tunes on random half class subsets); read in {sec:.1f} s.", ""]
    tr, val = split(len(d["train"]), cfg.seed + 1)
    scores = {k: fit_eval("probex", cfg, k, [(d["layers"], d["y"], d["train"][tr])],
                          (d["layers"], d["y"], d["train"][val]))[0][0] for k in weights}
    best = max(scores, key=scores.get)
    out += ["| layer | val acc (ProbeX) |", "|---|---|"] + [
        f"| {k}{' (chosen)' if k == best else ''} {tuple(d['layers'][k].shape[1:])} | {v:.3f} |" for k, v in scores.items()]
    out.append("")
    square = [k for k in weights if d["layers"][k].shape[1] == d["layers"][k].shape[2]]
    sets, tests = {main: (d["layers"], d["y"], d["train"])}, {main: (d["layers"], d["y"], d["test"])}
    for layer in dict.fromkeys([best] + square[-1:]):
        within(d, main, layer, cfg, sets, tests, out, stats=list(d["layers"]))


def fit_eval(kind: str, cfg: ProbeXConfig, layer: str, train_sets, test_set, stats=None):
    """Fit ``kind`` on the concatenated ``train_sets`` [(layers, y, idx)], evaluate on ``test_set``."""
    x = torch.cat([ls[layer][i] for ls, _, i in train_sets])
    y = np.concatenate([yy[i] for _, yy, i in train_sets])
    ls, yt, it = test_set
    if kind == "statnn":
        names = stats or ALL
        feats = {k: torch.cat([s[k][i] for s, _, i in train_sets]) for k in names}
        est, sec = timed(lambda: StatNNClassifier(seed=cfg.seed).fit(feats, y))
        return metrics(est.predict({k: ls[k][it] for k in names}), yt[it]), 0, sec
    cls = DenseExpert if kind == "dense" else ProbeXClassifier
    est, sec = timed(lambda: cls(cfg, layer).fit(x, y))
    return metrics(est.predict(ls[layer][it]), yt[it]), est.n_parameters_, sec


def task_a(trees: dict, cfg: ProbeXConfig, out: list[str]) -> None:
    main = sorted(trees, key=lambda t: -len(trees[t]["y"]))[0]
    sets = {t: (d["layers"], d["y"], d["train"]) for t, d in trees.items()}
    tests = {t: (d["layers"], d["y"], d["test"]) for t, d in trees.items()}
    # Layer selection: one ProbeX per candidate layer on the main tree, scored on a validation split.
    tr, val = split(len(trees[main]["train"]), cfg.seed + 1)
    d = trees[main]
    scores = {layer: fit_eval("probex", cfg, layer, [(d["layers"], d["y"], d["train"][tr])],
                              (d["layers"], d["y"], d["train"][val]))[0][0] for layer in WEIGHTS}
    best = max(scores, key=scores.get)
    out += ["### Layer selection (ProbeX, validation per-label accuracy, tree " + main + ")", "",
            "| layer | shape | val acc |", "|---|---|---|"]
    out += [f"| {k}{' (chosen)' if k == best else ''} | {tuple(d['layers'][k].shape[1:])} | {v:.3f} |"
            for k, v in scores.items()] + [""]
    for layer in dict.fromkeys([best, "layers.1.weight"]):
        within(d, main, layer, cfg, sets, tests, out)
    sweep(d, cfg, "layers.1.weight", out)
    for layer in dict.fromkeys([best, "layers.1.weight"]):
        across(trees, sets, tests, cfg, layer, out)


def within(d, main, layer, cfg, sets, tests, out, stats=None) -> None:
    out += [f"### Task A within tree {main} ({len(d['train'])} train / {len(d['test'])} test models, layer "
            f"{layer} {tuple(d['layers'][layer].shape[1:])})", "",
            "| method | per-label acc | exact-set acc | parameters | train time (s) |", "|---|---|---|---|---|"]
    for kind in ("probex", "dense", "statnn"):
        (acc, exact), params, sec = fit_eval(kind, cfg, layer, [sets[main]], tests[main], stats)
        label = {"probex": f"ProbeX (r={cfg.rank_u})", "dense": "dense linear expert",
                 "statnn": "StatNN (9 stats of every tensor, boosting)"}[kind]
        out.append(f"| {label} | {acc:.3f} | {exact:.3f} | {params if params else '-'} | {sec:.1f} |")
    out += ["", "chance: per-label 0.5, exact set 1/C(10,5) = 0.004", ""]


def sweep(d, cfg, layer, out) -> None:
    """Per-label test accuracy against the number of training models (the dense expert's weak spot)."""
    sizes = [n for n in (50, 100, 200, 400) if n < len(d["train"])] + [len(d["train"])]
    out += [f"### Task A: training models vs per-label test accuracy (layer {layer})", "",
            "| train models | " + " | ".join(map(str, sizes)) + " |", "|---|" + "---|" * len(sizes)]
    for kind in ("probex", "dense"):
        accs = [fit_eval(kind, cfg, layer, [(d["layers"], d["y"], d["train"][:n])],
                         (d["layers"], d["y"], d["test"]))[0][0] for n in sizes]
        out.append(f"| {'ProbeX' if kind == 'probex' else 'dense'} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    out.append("")


def across(trees, sets, tests, cfg, layer, out) -> None:
    """Pooled expert (all trees, no routing) vs per-tree experts behind a nearest-centroid router."""
    names = sorted(trees)
    pooled = ProbeXClassifier(cfg, layer).fit(torch.cat([s[0][layer][s[2]] for s in sets.values()]),
                                              np.concatenate([s[1][s[2]] for s in sets.values()]))
    experts = {t: ProbeXClassifier(cfg, layer).fit(sets[t][0][layer][sets[t][2]], sets[t][1][sets[t][2]]) for t in names}
    router = TreeRouter().fit(torch.cat([sets[t][0][layer][sets[t][2]] for t in names]),
                              [t for t in names for _ in sets[t][2]])
    out += [f"### Task A across trees, layer {layer} (per-label acc / exact-set acc on each tree's test models)", "",
            "| expert | " + " | ".join(names) + " | all |", "|---|" + "---|" * (len(names) + 1)]
    rows = {"pooled (one expert, all trees)": {}, "tree experts + router": {}, "own-tree expert (oracle)": {}}
    routed_ok = total = 0
    for t in names:
        ls, y, it = tests[t]
        x = ls[layer][it]
        routes = router.route(x)
        routed_ok += sum(r.tree == t for r in routes)
        total += len(routes)
        routed = np.stack([experts[r.tree].predict(x[i:i + 1])[0] if r.known else np.zeros(10)
                           for i, r in enumerate(routes)])
        rows["pooled (one expert, all trees)"][t] = (pooled.predict(x), y[it])
        rows["tree experts + router"][t] = (routed, y[it])
        rows["own-tree expert (oracle)"][t] = (experts[t].predict(x), y[it])
    for label, per in rows.items():
        cells = [metrics(*per[t]) for t in names]
        allm = metrics(np.concatenate([per[t][0] for t in names]), np.concatenate([per[t][1] for t in names]))
        out.append(f"| {label} | " + " | ".join(f"{a:.3f} / {e:.3f}" for a, e in cells + [allm]) + " |")
    out += ["", f"routing accuracy (centroids of the manifest's trees): {routed_ok}/{total} test models sent to "
            "their own tree"]
    x_train = torch.cat([sets[t][0][layer][sets[t][2]] for t in names])
    found = cluster_trees(x_train)
    truth = np.array([t for t in names for _ in sets[t][2]])
    pure = sum(np.unique(truth[found == k], return_counts=True)[1].max() for k in np.unique(found))
    out += [f"lineage clustering (modelatlas.lineage.detect_trees on this layer, no labels): {len(np.unique(found))} "
            f"trees found, purity {pure / len(truth):.3f}"]
    known = TreeRouter().fit(torch.cat([sets[t][0][layer][sets[t][2]] for t in names[:-1]]),
                             [t for t in names[:-1] for _ in sets[t][2]])
    stranger = known.route(tests[names[-1]][0][layer][tests[names[-1]][2]])
    out += [f"out-of-tree check (router fitted on {', '.join(names[:-1])} only): {sum(not r.known for r in stranger)}"
            f"/{len(stranger)} test models of {names[-1]} reported as belonging to no known tree", ""]
    return router


def cli_timing(zoo: Path, cfg: ProbeXConfig, out: list[str]) -> None:
    """Wall time of what `atlas probex train ZOO --layer layers.1.weight` does: read, 3 experts, router, save."""
    import tempfile

    from modelatlas.probex.experts import train_tree_experts

    with tempfile.TemporaryDirectory() as tmp:
        report, sec = timed(lambda: train_tree_experts(zoo / "classes_deep", tmp, "classes", "layers.1.weight", cfg))
    sizes = ", ".join(f"{t}: {v['models']}" for t, v in report.trees.items())
    out += [f"`atlas probex train {zoo / 'classes_deep'} --layer layers.1.weight --epochs {cfg.epochs} --rank "
            f"{cfg.rank_u}` equivalent (train_tree_experts; trees {sizes} models; read + train + router + save): "
            f"{sec:.1f} s on 1 thread.", ""]


def load_task_b(zoo: Path, seed: int):
    from modelatlas.probex.text_encoder import encode_texts

    manifest = make_named_class_zoo(zoo / "text", seed=seed)
    recs = [m for m in manifest.models if m.parent is not None]
    layers = load_layers([manifest.root / m.path for m in recs], WEIGHTS)
    labels = np.array([m.task["class_index"] for m in recs])
    classes = named_classes()
    prompts = [prompt(d, t) for d, t in classes]
    t_names = list(dict.fromkeys(t for _, t in classes))
    held = np.array([(d + t_names.index(t)) % 5 == 0 for d, t in classes])  # 12 unseen (digit, transform) pairs
    return layers, labels, prompts, encode_texts(prompts), held


def task_b(data, cfg: ProbeXConfig, out: list[str]) -> None:
    layers, labels, prompts, text, held = data
    seen_cls, unseen_cls = np.flatnonzero(~held), np.flatnonzero(held)
    is_seen = ~held[labels]
    train, test = split(int(is_seen.sum()), cfg.seed)
    seen_idx, unseen_idx = np.flatnonzero(is_seen), np.flatnonzero(~is_seen)
    tr, te = seen_idx[train], seen_idx[test]
    remap = {c: i for i, c in enumerate(seen_cls)}
    y_tr = np.array([remap[c] for c in labels[tr]])
    tcfg = ProbeXConfig(**{**cfg.to_dict(), "lr": 2e-3})
    scores = {}
    for layer in WEIGHTS:
        est = ProbeXTextAligner(tcfg, layer).fit(layers[layer][tr], y_tr, text[seen_cls])
        scores[layer] = (est.history_["best_score"], -est.history_["best_loss"])
    best = max(scores, key=scores.get)
    out += ["### Task B layer selection (ProbeX, validation top-1 over seen prompts)", "",
            "| layer | val top-1 | val CE |", "|---|---|---|"] + [
                f"| {k}{' (chosen)' if k == best else ''} | {v[0]:.3f} | {-v[1]:.3f} |" for k, v in scores.items()]
    out += ["", f"### Task B: weights <-> MiniLM text ({len(seen_cls)} seen / {len(unseen_cls)} held-out named "
            f"classes, {len(tr)} train models, layer {best})", "",
            "| method | in-dist top-1 | zero-shot top-1 | search top-1 match (cosine) | search top-1 match "
            "(normalised) | parameters | train (s) |", "|---|---|---|---|---|---|---|"]
    pool = np.concatenate([te, unseen_idx])  # search ranks every test model
    for label, over in (("ProbeX", {}), ("ProbeX without ReLU", {"relu": False}), ("dense expert", {"model": "dense"})):
        c = ProbeXConfig(**{**tcfg.to_dict(), **over})
        est, sec = timed(lambda c=c: ProbeXTextAligner(c, best).fit(layers[best][tr], y_tr, text[seen_cls]))
        ind = (seen_cls[est.predict(layers[best][te], text[seen_cls])] == labels[te]).mean()
        zs = (unseen_cls[est.predict(layers[best][unseen_idx], text[unseen_cls])] == labels[unseen_idx]).mean()
        sim = est.similarity(layers[best][pool], text[unseen_cls])  # (models, unseen queries)
        first = (labels[pool][sim.argmax(0)] == unseen_cls).mean()
        norm = np.stack([est.search_scores(layers[best][pool], text[c], text[seen_cls]) for c in unseen_cls], 1)
        first_n = (labels[pool][norm.argmax(0)] == unseen_cls).mean()
        out.append(f"| {label} | {ind:.3f} | {zs:.3f} | {first:.2f} | {first_n:.2f} | {est.n_parameters_:,} | {sec:.1f} |")
        if label == "ProbeX":
            examples = [(prompts[c], [prompts[labels[pool][i]] for i in np.argsort(-norm[:, j])[:3]])
                        for j, c in enumerate(unseen_cls[:3])]
    out += ["", f"chance: in-dist 1/{len(seen_cls)} = {1 / len(seen_cls):.3f}, zero-shot 1/{len(unseen_cls)} = "
            f"{1 / len(unseen_cls):.3f}; search: {len(unseen_cls)} held-out prompts over {len(pool)} test models "
            f"(chance of a match first ~{np.mean([(labels[pool] == c).mean() for c in unseen_cls]):.3f})", "",
            "Search top-1 match: for each held-out prompt, is the top-ranked test model one of that class? "
            "Normalised = log-probability of the query against the 48 seen prompts (what `atlas probex search` "
            "uses).", "", "Example searches (held-out prompts, normalised, top 3 models' true classes):", ""]
    out += [f"- \"{q}\" -> " + "; ".join(f'"{p}"' for p in top) for q, top in examples]
    out.append("")


KEEP = "### Larger label space"


def write_section(path: Path, lines: list[str]) -> None:
    """Replace the "## ProbeX" section of docs/benchmarks.md (up to the next "## " heading), keeping its
    "### Larger label space" subsection (bench/probex_wide.py) if present."""
    from modelatlas.atomic import atomic_write_text

    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = "\n".join(["## ProbeX", ""] + lines).rstrip() + "\n"
    start = text.find("\n## ProbeX\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        old = text[start + 1: end + 1 if end >= 0 else len(text)]
        kept = old.find(KEEP)  # the subsection written by bench/probex_wide.py survives a rewrite
        if kept >= 0:
            section += "\n" + old[kept:].rstrip() + "\n"
        text = text[: start + 1] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    atomic_write_text(path, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default="/tmp/probex_zoo", help="cache folder for the zoos")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="zoo seed (and split/expert seed)")
    p.add_argument("--skip", choices=["a", "b"], default=None)
    p.add_argument("--external", default=None, help="also run Task A within the largest tree of this zoo manifest")
    p.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = p.parse_args(argv)
    keep_freed_memory()  # large blocks stay mapped between steps (modelatlas.allocator)
    torch.set_num_threads(1)
    cfg = ProbeXConfig(rank_u=args.rank, rank_v=args.rank, rank_t=args.rank, epochs=args.epochs, seed=args.seed)
    zoo = Path(args.zoo)
    out = [f"Command: `python bench/probex.py --zoo {args.zoo} --epochs {args.epochs} --rank {args.rank} "
           f"--seed {args.seed}{f' --skip {args.skip}' if args.skip else ''}"
           f"{f' --external {args.external}' if args.external else ''}"
           f"{' --write' if args.write else ''}` (1 thread, {time.strftime('%Y-%m-%d')}).", "",
           "Zoos (modelatlas.probex.families, MLP 64-128-128-128-10 on sklearn digits, cached): Task A: 3 trees "
           "(roots with different seeds; 20 all-class intermediate fine-tunes of 150-300 steps each, then 1,000 / "
           "300 / 300 children below them), each child fine-tuned 40-100 Adam steps (lr 5e-4-2e-3) on a random 5 "
           "of the 10 classes; 80/20 train/test split per tree. Task B: 1 root, 60 named classes (10 digits x 6 transforms named in "
           "words) x 10 fine-tunes with the class's digit weighted 8x on transformed inputs.", ""]
    t0 = time.perf_counter()
    warm_up()
    if args.skip != "a":
        trees, sec = timed(lambda: load_task_a(zoo, args.seed))
        n = sum(len(d["y"]) for d in trees.values())
        out += [f"Reading {n} models' tensors through modelatlas.weights: {sec:.1f} s.", ""]
        task_a(trees, cfg, out)
        cli_timing(zoo, cfg, out)
        print("\n".join(out), flush=True)
    if args.external:
        external(args.external, cfg, out)
    if args.skip != "b":
        task_b(load_task_b(zoo, args.seed), cfg, out)
    out.append(f"Total benchmark time: {time.perf_counter() - t0:.0f} s.")
    print("\n".join(out))
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Folders that mix training regimes (`--stage auto`): trained zoos, whose kurtosis rises along their edges
("generalize"), recovered together with synthetic forests whose kurtosis falls ("specialize",
`lineage.synthetic.make_synthetic_forest`, written as safetensors). Directed accuracy per family.

    python bench/lineage_mixed_stage.py ZOO [ZOO ...] --work /tmp/mixed-stage [--seeds 0 1 2] [--chains CHAIN ...]
        [--json rows.json]

Three kinds of rows, the first two for every seed:
  * ``zoo+syn``: each trained ZOO (3 trees of 13, say) with a synthetic specialize forest of 1 or 3 trees of 13
    (4 square 32 x 32 layers: another architecture group, recovered in the same call, as a user's folder is);
  * ``syn+syn``: one architecture: a synthetic generalize forest and a specialize one (1 + 3 and 3 + 1 trees of 13),
    their roots drawn apart (different seeds), so that only the trees' kurtosis tells their regimes apart;
  * ``chain+zoo``: each trained zoo of chains (``--chains``, e.g. `lineage-full` with children 1, depth 4: the
    weakest evidence, none or one violation's lean) with each ZOO: one regime; a chain should follow the zoo's.
Per row and family: the stage its trees were given (``decisions["stage_trees"]``, or the one ``stage`` before
session 31) and its true edges recovered with their direction. Reads only ``decisions["stage"]`` where there is
no ``stage_trees``, so the same script measures the library before (``PYTHONPATH`` to its ``src``). Time: ~1 s a
row on 2 cores.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import contextlib
import io
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import zoo_mix as Z  # bench/zoo_mix.py: models linked under a prefix, main()'s tail
from safetensors.torch import save_file

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.scoring import score_forest
from modelatlas.lineage.synthetic import make_synthetic_forest
from modelatlas.zoo import load_manifest


def synthetic(work: Path, prefix: str, stage: str, n_trees: int, seed: int) -> tuple[list[Path], dict]:
    """A synthetic forest (``n_trees`` trees of 13, 32 x 32 layers) written under ``work`` as ``prefix``-named
    safetensors files (kept: same seed, same files), and its truth under those names."""
    weights, parents = make_synthetic_forest(n_trees=n_trees, children=3, depth=2, dim=32, stage=stage, seed=seed)
    folder = work / f"{prefix}{stage}-{n_trees}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, tensors in weights.items():
        paths.append(folder / f"{prefix}{name}.safetensors")
        if not paths[-1].exists():
            save_file(tensors, str(paths[-1]))
    return paths, {prefix + n: None if p is None else prefix + p for n, p in parents.items()}


def trained(zoo: Path) -> tuple[list[Path], dict]:
    """A built zoo's model paths and its truth."""
    man = load_manifest(zoo)
    return [zoo / m.path for m in man.models], {m.name: m.parent for m in man.models}


def run(families: dict[str, tuple[list[Path], dict]]) -> dict:
    """Recover all families' models in one call; per family: the stages its trees got, edges right, edges."""
    with contextlib.redirect_stderr(io.StringIO()):
        forest = recover_lineage([p for paths, _ in families.values() for p in paths])
    d = forest.decisions
    per_tree = [t["stage"] for t in d.get("stage_trees") or []] or [d["stage"]] * len(forest.trees)
    out = {}
    for fam, (_, truth) in families.items():
        stages = sorted({s for tree, s in zip(forest.trees, per_tree) if set(tree) & set(truth)})
        s = score_forest(forest, truth)
        out[fam] = {"stage": "/".join(stages), "correct": s.n_correct, "edges": s.n_true_edges}
    return {"stage": d["stage"], "evidence": d["stage_evidence"], "families": out}


def rows_for(zoos: list[Path], seeds: list[int], work: Path, chains: list[Path]):
    """Yield (case, families) for every row: each zoo with 1 and 3 specialize trees, the syn+syn rows, then each
    chain zoo with each zoo (names prefixed "C-": both zoos name their models t0, t0.0, ...)."""
    for chain in chains:
        for zoo in zoos:
            paths, truth = trained(chain)
            yield ("chain+zoo", f"{chain.name}+{zoo.name}", 0), {"trained": trained(zoo), "chain": Z.linked(
                {p.name: p for p in paths}, truth, work / "chains" / chain.name, "C-")}
    for seed in seeds:
        for zoo in zoos:
            for n in (1, 3):
                yield (f"zoo+syn{n}", zoo.name, seed), {"trained": trained(zoo),
                                                        "specialize": synthetic(work, "S-", "specialize", n, seed)}
        for n_gen, n_spec in ((1, 3), (3, 1)):
            yield (f"syn{n_gen}+syn{n_spec}", "synthetic", seed), {
                "generalize": synthetic(work, "G-", "generalize", n_gen, 100 + seed),
                "specialize": synthetic(work, "S-", "specialize", n_spec, seed)}


def table(rows: list[dict]) -> str:
    """Markdown: per case and family, the rows whose family got its true stage, and its edges right."""
    by = defaultdict(lambda: [0, 0, 0, 0])
    for r in rows:
        for fam, f in r["families"].items():
            b = by[(r["case"], fam)]
            truth = "specialize" if fam == "specialize" else "generalize"
            b[0], b[1], b[2], b[3] = b[0] + (f["stage"] == truth), b[1] + 1, b[2] + f["correct"], b[3] + f["edges"]
    out = ["| case | family | stage right | directed |", "|---|---|---|---|"]
    out += [f"| {c} | {fam} | {b[0]} / {b[1]} | {b[2]} / {b[3]} ({100 * b[2] / b[3]:.1f} %) |"
            for (c, fam), b in by.items()]
    return "\n".join(out)


def rows(args) -> Iterator[dict]:
    """Every row of :func:`rows_for`, recovered."""
    for (case, zoo, seed), families in rows_for(args.zoos, args.seeds, args.work, args.chains):
        yield {"case": case, "zoo": zoo, "seed": seed, **run(families)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoos", nargs="+", type=Path, help="trained zoos (generalize), built by `atlas zoo make`")
    ap.add_argument("--work", type=Path, required=True, help="where the synthetic forests are written")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="synthetic seeds (none: chain rows only)")
    ap.add_argument("--chains", type=Path, nargs="*", default=[], help="trained zoos of chains (generalize)")
    Z.report(ap, rows, table)


if __name__ == "__main__":
    main()

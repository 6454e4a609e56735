"""Known descents in the stage decision (`--stage auto`): a LoRA star stored as adapters on its base, given with
`adapter_base` (`--base`) so that its tree's directions are known, recovered together with another zoo's trees,
whose bases are not known. The star's tree hangs from its base whatever the stage; the stage orients the others.

    atlas zoo make --shape star --trees 1 --children C --method lora --storage adapter --seed S --out STARS/star_cC_sS
    python bench/lineage_known_stage.py STARS/star_* --work /tmp/known-stage [--json rows.json]

The other zoos (digits MLP, the stars' architecture, so one architecture group with them) are built under
WORK/zoos (resumable): 2 chains of 5 full fine-tunes (`lineage-full`, children 1, depth 4; seeds 300-303, the
shape whose stage evidence is weakest), 2 LoRA trees of 13 (`lineage-lora`, seeds 300-301) and 2 mixed trees of 7
(`demo`, seeds 300-301). Models are linked under WORK/links with a prefix (S. / O.: both zoos name theirs t0,
t0.0, ...). Each other zoo is recovered alone and with each star. Per row: the stage chosen, whether it is the
one the other zoo's true edges follow (the majority direction of their summed kurtosis) and the directed
accuracy on the other zoo's edges (the star's models are not in its truth: not scored). Time: ~1 s a row on
2 cores.
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

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.scoring import score_forest
from modelatlas.weights import open_checkpoint
from modelatlas.zoo import load_manifest, make_zoo, preset

OTHERS = {**{f"chain_s{s}": ("lineage-full", dict(trees=2, children=1, depth=4, seed=s)) for s in range(300, 304)},
          **{f"lora_s{s}": ("lineage-lora", dict(trees=2, seed=s)) for s in (300, 301)},
          **{f"demo_s{s}": ("demo", dict(trees=2, seed=s)) for s in (300, 301)}}


def linked(zoo: Path, prefix: str, links: Path) -> tuple[list[Path], dict[str, str | None]]:
    """Symlinks links/<zoo>/<prefix><model> to the zoo's models (sorted), and the zoo's truth under those names."""
    man = load_manifest(zoo)
    paths, truth = Z.linked({m.name: zoo / m.path for m in man.models}, {m.name: m.parent for m in man.models},
                            links / zoo.name, prefix)
    return sorted(paths), truth


def true_stage(forest, truth: dict[str, str | None]) -> str:
    """The stage the true edges follow: "generalize" when the summed kurtosis rose along most of them."""
    up = [forest.kurtosis[c] > forest.kurtosis[p] for c, p in truth.items() if p is not None]
    return "generalize" if 2 * sum(up) > len(up) else "specialize"


def run(paths: list[Path], base: Path | None, truth: dict[str, str | None]) -> dict:
    """Recover ``paths`` (``base``: the adapters' base, among them) with the stage found; score the zoo of ``truth``."""
    with contextlib.redirect_stderr(io.StringIO()):
        if base is None:
            forest = recover_lineage(paths)
        else:
            with open_checkpoint(base) as b:
                forest = recover_lineage(paths, adapter_base=b)
    s, d = score_forest(forest, truth), forest.decisions
    return {"stage": d["stage"], "evidence": d["stage_evidence"], "known": d.get("stage_known"),
            "right_stage": d["stage"] == true_stage(forest, truth), "correct": s.n_correct, "edges": s.n_true_edges}


def table(rows: list[dict]) -> str:
    """Markdown: per kind of other zoo, with a star, the stages right and the edges right."""
    by = defaultdict(lambda: [0, 0, 0, 0])
    for r in rows:
        if r["star"] is not None:
            b = by[r["other"].split("_")[0]]
            b[0], b[1], b[2], b[3] = b[0] + r["right_stage"], b[1] + 1, b[2] + r["correct"], b[3] + r["edges"]
    out = ["| other zoos | stage right | directed, other zoos' edges |", "|---|---|---|"]
    out += [f"| {k} | {b[0]} / {b[1]} | {b[2]} / {b[3]} ({100 * b[2] / b[3]:.1f} %) |" for k, b in by.items()]
    return "\n".join(out)


def rows(args) -> Iterator[dict]:
    """Each other zoo alone, then with each star (its base given)."""
    for name, (kind, overrides) in OTHERS.items():
        zoo = args.work / "zoos" / name
        make_zoo(preset(kind, **overrides), zoo, workers=1)
        paths, truth = linked(zoo, "O.", args.work / "links")
        yield {"other": name, "star": None, **run(paths, None, truth)}
        for star in args.stars:
            spaths, _ = linked(star, "S.", args.work / "links")
            base = next(p for p in spaths if p.name == "S.t0")
            yield {"other": name, "star": star.name, **run(spaths + paths, base, truth)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stars", nargs="+", type=Path, help="star zoos stored as adapters on their base t0")
    ap.add_argument("--work", type=Path, required=True)
    Z.report(ap, rows, table)


if __name__ == "__main__":
    main()

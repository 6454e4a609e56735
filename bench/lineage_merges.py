"""Merged models among trained zoos: are they found, and do they still pull their parents out of place?

    python bench/lineage_merges.py /tmp/zoos/* --work /tmp/merges [--seed 0] [--json rows.json]

Per zoo (folders as ``modelatlas.zoo`` writes them), a zoo built with merges (``atlas zoo make --merges K``) is
taken as built (its merges and their parents are in its manifest); in other zoos merges of its fine-tuned models
are written beside links to its models, seeded: in each tree one linear merge of two siblings, ``a A + (1 - a) B`` (a uniform in 0.2-0.8), one
task-arithmetic merge of two siblings on their parent, ``P + x (A - P) + y (B - P)`` (x, y uniform in 0.3-1.0),
and one linear merge of two cousins; float32, and each again rounded to bfloat16 (``--bf16``); with
``--per-layer`` the two-parent ones instead with a weight per tensor (a ramp; linear and SLERP). The zoo is then
recovered three ways: without the merges, with them and merge detection on (the default), with them and
``merges=False``. Per row: merges planted, found with their exact parents, found with others, missed; real
models taken for merges; and the directed accuracy on the zoo's own true edges in each of the three runs (the
merges are not in the truth). Time: three recoveries a zoo (~1 s each on 2 cores for 39 small models).

    python bench/lineage_merges.py --trajectories x --work /tmp/merges

checks instead the non-merges most like merges: 12 checkpoints of one training run, an intermediate checkpoint
lying near the line through two others (:data:`RUNS`, float32 and bfloat16): how many are taken for merges.
"""

from __future__ import annotations

import short_spin  # noqa: F401  # isort: skip  (first: GOMP_SPINCOUNT before torch loads)
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import zoo_mix as Z  # bench/zoo_mix.py: models linked under a prefix, main()'s tail
from safetensors.torch import load_file, save_file

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.scoring import same_merge_parents, score_forest
from modelatlas.zoo import load_manifest
from modelatlas.zoo.config import SPARSE_MERGE_KINDS


def plan(manifest, rng: np.random.Generator) -> dict[str, dict]:
    """name -> {"parents": [...], "weights": [...]} of the merges to write: per tree a sibling pair's linear and
    task-arithmetic merge, and a linear merge of cousins, where the tree has them."""
    kids: dict[str | None, list[str]] = {}
    for m in manifest.models:
        kids.setdefault(m.parent, []).append(m.name)
    out = {}
    for root in kids.get(None, []):
        sibs = [c for c in kids.get(root, []) if kids.get(c)]  # children with children of their own
        if len(kids.get(root, [])) >= 2:
            a, b = rng.choice(kids[root], 2, replace=False).tolist()
            t = float(rng.uniform(0.2, 0.8))
            out[f"lin-{a}+{b}"] = {"parents": [a, b], "weights": [t, 1 - t]}
            x, y = rng.uniform(0.3, 1.0, 2).tolist()
            out[f"ta-{root}+{a}+{b}"] = {"parents": [root, a, b], "weights": [1 - x - y, x, y]}
        if len(sibs) >= 2:
            p, q = rng.choice(sibs, 2, replace=False).tolist()
            a, b = rng.choice(kids[p]).item(), rng.choice(kids[q]).item()
            t = float(rng.uniform(0.2, 0.8))
            out[f"lin-{a}+{b}"] = {"parents": [a, b], "weights": [t, 1 - t]}
    return out


def layered(merges: dict[str, dict], rng: np.random.Generator) -> dict[str, dict]:
    """The two-parent merges of ``merges`` again with a weight per tensor (mergekit's layer gradients): a ramp
    over the tensors in name order between two ends drawn in 0.1-0.9, as a linear merge (``grad-``) and as SLERP
    of each tensor pair (``slerp-``)."""
    out = {}
    for name, rec in merges.items():
        if len(rec["parents"]) == 2:
            ends = rng.uniform(0.1, 0.9, 2).tolist()
            for how in ("grad", "slerp"):
                out[f"{how}-{name.split('-', 1)[1]}"] = {"parents": rec["parents"], "ramp": ends, "how": how}
    return out


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two tensors as flat vectors (mergekit's per-tensor SLERP), t the weight of b."""
    fa, fb = a.flatten().double(), b.flatten().double()
    theta = torch.arccos((fa @ fb / (fa.norm() * fb.norm())).clamp(-1, 1))
    if theta < 1e-6:
        return (1 - t) * a.double() + t * b.double()
    return ((torch.sin((1 - t) * theta) * fa + torch.sin(t * theta) * fb) / torch.sin(theta)).view(a.shape)


def _merged(rec: dict, ts: list[dict]) -> dict:
    """The merge of the parents' tensors ``ts`` that the record says (float64)."""
    if "ramp" not in rec:
        return {k: sum(w * t[k].double() for w, t in zip(rec["weights"], ts)) for k in ts[0]}
    keys = sorted(ts[0])
    ramp = np.linspace(*rec["ramp"], len(keys))  # the first parent's weight per tensor
    if rec["how"] == "grad":
        return {k: w * ts[0][k].double() + (1 - w) * ts[1][k].double() for k, w in zip(keys, ramp)}
    return {k: _slerp(1 - w, ts[0][k], ts[1][k]) for k, w in zip(keys, ramp)}


def write(merges: dict[str, dict], paths: dict[str, Path], folder: Path, bf16: bool) -> list[Path]:
    """Each merge as ``folder/NAME.safetensors`` (float32, or rounded to bfloat16): its parents' tensors merged
    (:func:`_merged`), every float tensor they share."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, rec in merges.items():
        target = folder / f"{name}{'-bf16' if bf16 else ''}.safetensors"
        if not target.exists():
            merged = _merged(rec, [load_file(str(_weights(paths[p]))) for p in rec["parents"]])
            save_file({k: (v.bfloat16() if bf16 else v.float()).contiguous() for k, v in merged.items()}, str(target))
        out.append(target)
    return out


def _weights(path: Path) -> Path:
    return path / "model.safetensors" if path.is_dir() else path


def rows(args: argparse.Namespace):
    for zoo in args.zoos:
        manifest = load_manifest(zoo / "manifest.json")
        own = manifest.merges()  # a zoo built with merges (`atlas zoo make --merges K`): those, as built
        truth = {m.name: m.parent for m in manifest.models if m.name not in own}
        paths = {m.name: manifest.path_of(m.name) for m in manifest.models if m.name not in own}
        if own:
            merges, files, bf16 = own, [manifest.path_of(n) for n in own], False
        else:
            merges = plan(manifest, np.random.default_rng(args.seed))
            merges = layered(merges, np.random.default_rng(args.seed + 1)) if args.per_layer else merges
            files, bf16 = write(merges, paths, args.work / zoo.name, args.bf16), args.bf16
        plain = recover_lineage(list(paths.values()))
        found = recover_lineage([*paths.values(), *files])
        off = recover_lineage([*paths.values(), *files], merges=False)
        yield {"zoo": zoo.name, **_found(found, merges, bf16),
               **{f"acc_{k}": score_forest(f, truth).n_correct for k, f in (("plain", plain), ("on", found), ("off", off))},
               "edges": score_forest(plain, truth).n_true_edges}


def _found(forest, merges: dict[str, dict], bf16: bool) -> dict:
    """Merges planted / found with their exact parents / found with other parents / missed; real models taken
    for merges; the largest weight error of the exact ones."""
    got = forest.decisions.get("model_merges", {})
    suffix = "-bf16" if bf16 else ""
    exact = [n for n in merges if n + suffix in got and same_merge_parents(got[n + suffix], merges[n])]
    err = max((abs(dict(zip(got[n + suffix]["parents"], got[n + suffix]["weights"])).get(p, 0.0) - w)
               for n in exact if "weights" in merges[n] and merges[n].get("kind") not in ("slerp", *SPARSE_MERGE_KINDS)
               for p, w in zip(merges[n]["parents"], merges[n]["weights"])), default=0.0)
    planted = {n + suffix for n in merges}
    kinds = {n: [merges[n]["kind"], got[n + suffix].get("kind")] for n in exact if merges[n].get("kind") in SPARSE_MERGE_KINDS}
    return {"planted": len(merges), "exact": len(exact), "other": sum(n + suffix in got for n in merges) - len(exact),
            "missed": sum(n + suffix not in got for n in merges), "false": sorted(set(got) - planted),
            "weight_err": round(err, 4), "sparse_kinds": kinds, "kind_right": sum(a == b for a, b in kinds.values())}


RUNS = {"adam 1e-3, every 50 steps": ("adam", 1e-3, 50), "adam 1e-4, every 20 steps": ("adam", 1e-4, 20),
        "adam 1e-3, every 5 steps": ("adam", 1e-3, 5), "sgd 0.05 momentum 0.9, every 50 steps": ("sgd", 0.05, 50)}


def trajectory(opt: str, lr: float, every: int, bf16: bool, seed: int, n: int = 12) -> dict[str, dict]:
    """``n`` checkpoints of one training run (MLP 64-64-64-10 on scikit-learn digits, batch 64, seeded): the
    non-merges nearest to a merge, an intermediate checkpoint lying near the line through two others."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    optim = torch.optim.Adam(net.parameters(), lr) if opt == "adam" else torch.optim.SGD(net.parameters(), lr, momentum=0.9)
    out = {}
    for step in range(1, every * n + 1):
        i = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x[i]), y[i])
        optim.zero_grad(), loss.backward(), optim.step()
        if step % every == 0:
            out[f"ckpt-{step:05d}"] = {k: (v.detach().bfloat16() if bf16 else v.detach().clone()) for k, v in net.state_dict().items()}
    return out


def trajectory_rows(args: argparse.Namespace):
    """Checkpoints of one run each (:data:`RUNS`), float32 and bfloat16: models taken for merges (none is one)."""
    for label, (opt, lr, every) in RUNS.items():
        for bf16 in (False, True):
            forest = recover_lineage(trajectory(opt, lr, every, bf16, args.seed), stage="generalize")
            got = forest.decisions.get("model_merges", {})
            yield {"run": label + (", bfloat16" if bf16 else ""), "checkpoints": len(forest.nodes),
                   "taken_for_merges": sorted(got), "residuals": [got[n]["residual"] for n in sorted(got)]}


def trajectory_table(out: list[dict]) -> str:
    lines = ["| run (checkpoints of one training run) | checkpoints | taken for merges |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['checkpoints']} | {len(r['taken_for_merges'])} |" for r in out]
    return "\n".join(lines)


def table(out: list[dict]) -> str:
    lines = ["| zoo | merges planted | found, right parents | found, other parents | missed | real models taken for "
             "merges | directed: no merges / with, detection on / with, off |", "|---|---|---|---|---|---|---|"]
    for r in out:
        lines.append(f"| {r['zoo']} | {r['planted']} | {r['exact']} | {r['other']} | {r['missed']} | "
                     f"{len(r['false'])} | {r['acc_plain']} / {r['acc_on']} / {r['acc_off']} of {r['edges']} |")
    tot = {k: sum(r[k] for r in out) for k in ("planted", "exact", "other", "missed", "acc_plain", "acc_on", "acc_off", "edges")}
    lines.append(f"| **all {len(out)}** | {tot['planted']} | {tot['exact']} | {tot['other']} | {tot['missed']} | "
                 f"{sum(len(r['false']) for r in out)} | {tot['acc_plain']} / {tot['acc_on']} / {tot['acc_off']} of "
                 f"{tot['edges']} |")
    sparse = [tuple(k) for r in out for k in r.get("sparse_kinds", {}).values()]  # (planted, reported) kinds
    if sparse:
        lines.append(f"\nTIES / DARE merges found: {len(sparse)}, reported with their planted kind: "
                     f"{sum(a == b for a, b in sparse)}; (planted, reported): {dict(sorted(Counter(sparse).items()))}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoos", nargs="+", type=Path, help="zoo folders, each with its manifest.json")
    ap.add_argument("--work", type=Path, required=True, help="where the merges are written (kept: reruns reuse them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="the merges rounded to bfloat16")
    ap.add_argument("--per-layer", action="store_true", help="the two-parent merges with a weight per tensor "
                    "instead: a linear ramp over the tensors, and SLERP per tensor")
    ap.add_argument("--trajectories", action="store_true", help="instead: checkpoints of single training runs "
                    "(no merges among them; the zoos are not read)")
    torch.set_num_threads(1)
    if "--trajectories" in sys.argv:
        Z.report(ap, trajectory_rows, trajectory_table)
    else:
        Z.report(ap, rows, table)


if __name__ == "__main__":
    main()

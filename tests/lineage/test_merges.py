"""Merged models (lineage.merges): weighted sums of other models given are found from the squared distances
alone, with their parents and weights, and placed beside their parents instead of inside the tree."""

import numpy as np
import pytest
import torch

from modelatlas.errors import ConfigError
from modelatlas.lineage import LineageConfig, recover_lineage
from modelatlas.lineage.export import to_text
from modelatlas.lineage.forest import Forest
from modelatlas.lineage.merges import find_merges
from modelatlas.lineage.synthetic import make_synthetic_forest


def make_points(seed: int = 0, dim: int = 2000):
    """A base P, fine-tunes A and B of it, C of A, D of P (independent updates of 10 % of the weights' RMS)."""
    rng = np.random.default_rng(seed)
    p = rng.normal(size=dim)
    a, b, d = (p + 0.1 * rng.normal(size=dim) for _ in range(3))
    c = a + 0.1 * rng.normal(size=dim)
    return {"P": p, "A": a, "B": b, "C": c, "D": d}


def check_found(points: dict) -> dict:
    """name -> (parent names, weights rounded to 3 places) of every merge found among ``points``."""
    names = list(points)
    x = np.stack([points[n] for n in names])  # (N, dim)
    sq = ((x[:, None] - x[None]) ** 2).sum(-1)  # (N, N)
    return {names[m.child]: (tuple(names[p] for p in m.parents), tuple(round(w, 3) for w in m.weights))
            for m in find_merges(sq, list(range(len(names))))}


def test_a_linear_merge_and_a_task_arithmetic_merge_are_found_with_their_weights():
    pts = make_points()
    pts["lin"] = 0.3 * pts["A"] + 0.7 * pts["B"]
    pts["ta"] = pts["P"] + 0.8 * (pts["A"] - pts["P"]) + 0.6 * (pts["B"] - pts["P"])
    found = check_found(pts)
    assert found["lin"] == (("B", "A"), (0.7, 0.3))
    parents, weights = found["ta"]
    assert dict(zip(parents, weights)) == {"P": -0.4, "A": 0.8, "B": 0.6}
    assert set(found) == {"lin", "ta"}  # the parents, whose sums the merges are, are not taken for merges


def test_a_soup_and_a_task_arithmetic_merge_of_the_same_siblings_are_both_found():
    pts = make_points()
    pts["soup"] = 0.5 * pts["A"] + 0.5 * pts["B"]  # on the segment from P to ta as well (5/8 of the way)
    pts["ta"] = pts["P"] + 0.8 * (pts["A"] - pts["P"]) + 0.8 * (pts["B"] - pts["P"])  # P fits at 1.33, 1.33
    found = check_found(pts)
    assert set(found) == {"soup", "ta"} and set(found["soup"][0]) == {"A", "B"}
    assert dict(zip(*found["ta"])) == {"P": -0.6, "A": 0.8, "B": 0.8}


def test_fine_tunes_chains_and_like_task_siblings_are_no_merges():
    assert check_found(make_points()) == {}
    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.normal(size=(12, 3000)), 0)  # checkpoints of a random walk
    assert check_found({f"c{i}": w for i, w in enumerate(walk)}) == {}
    base, task = rng.normal(size=3000), 0.1 * rng.normal(size=3000)  # one shared task direction, own noise
    sibs = {f"s{i}": base + task + 0.07 * rng.normal(size=3000) for i in range(8)}
    assert check_found({"base": base, **sibs}) == {}


def test_a_parallelogram_takes_the_base_by_its_own_fine_tunes():
    pts = make_points()
    pts["sum"] = pts["A"] + pts["B"] - pts["P"]  # task arithmetic at weights 1 and 1: P = A + B - sum too
    assert check_found({k: pts[k] for k in ("P", "A", "B", "sum")}) == {}  # nothing tells which: neither
    found = check_found(pts)  # D, a fine-tune of P, tells P is the base
    assert found == {"sum": (("P", "A", "B"), (-1.0, 1.0, 1.0))}


def make_merged_forest():
    """A synthetic forest (2 trees, 3 x 3 x 2) as float32 state dicts, plus two merges of t0's children."""
    weights, parents = make_synthetic_forest(n_trees=2, children=3, depth=2, seed=4)
    a, b, p = weights["t0_0"], weights["t0_1"], weights["t0"]
    weights["lin"] = {k: 0.5 * a[k] + 0.5 * b[k] for k in a}
    weights["ta"] = {k: p[k] + 0.7 * (a[k] - p[k]) + 0.9 * (b[k] - p[k]) for k in a}
    return weights, parents


def test_recovery_places_merges_beside_their_parents_and_leaves_the_trees_as_without_them():
    weights, parents = make_merged_forest()
    plain = recover_lineage({k: v for k, v in weights.items() if k in parents}, stage="specialize")
    forest = recover_lineage(weights, stage="specialize")
    got = {(e.parent, e.child) for e in forest.edges if e.kind != "merge"}
    assert got == {(e.parent, e.child) for e in plain.edges}
    merges = forest.decisions["model_merges"]
    assert merges["lin"]["parents"] == ["t0_0", "t0_1"] and merges["lin"]["weights"] == pytest.approx([0.5, 0.5])
    assert dict(zip(merges["ta"]["parents"], merges["ta"]["weights"])) == pytest.approx(
        {"t0": -0.6, "t0_0": 0.7, "t0_1": 0.9}, abs=1e-4)
    edges = {e.child: e for e in forest.edges if e.kind == "merge"}
    assert (edges["lin"].parent, edges["ta"].parent) == ("t0_0", "t0_1")  # the most weighted parent
    assert edges["ta"].score == pytest.approx(1.0, abs=1e-3) and edges["ta"].distance > 0
    text = to_text(forest)
    line = next(x for x in text.splitlines() if "── ta  " in x)
    assert line.split("── ")[1].startswith("ta  (merge: ") and all(t in line for t in ("-0.60 t0 ", "0.70 t0_0", "0.90 t0_1"))
    assert "lin  (merge: 0.50 t0_0 + 0.50 t0_1)" in text
    back = Forest.from_dict(forest.to_dict())
    assert [e.kind for e in back.edges] == [e.kind for e in forest.edges]


def test_merges_false_places_them_as_models():
    weights, _ = make_merged_forest()
    forest = recover_lineage(weights, stage="specialize", merges=False)
    assert "model_merges" not in forest.decisions and {e.kind for e in forest.edges} == {"trained"}
    with pytest.raises(ConfigError, match="merges must be True"):
        LineageConfig(merges="yes")


def test_a_bfloat16_merge_is_found_through_its_rounding():
    gen = torch.Generator().manual_seed(2)
    base = {f"l{i}.weight": torch.randn(64, 64, generator=gen) for i in range(3)}
    ft = [{k: v + 0.05 * torch.randn(64, 64, generator=gen) for k, v in base.items()} for _ in range(3)]
    models = {"base": base, **{f"ft{i}": f for i, f in enumerate(ft)}}
    models["soup"] = {k: ((ft[0][k] + ft[1][k]) / 2).bfloat16() for k in base}  # rounded: off its line
    forest = recover_lineage(models, stage="specialize")
    assert sorted(forest.decisions["model_merges"]["soup"]["parents"]) == ["ft0", "ft1"]
    assert forest.decisions["model_merges"]["soup"]["residual"] < 0.05


def test_a_merge_with_a_weight_per_layer_is_found_with_those_weights():
    weights, parents = make_synthetic_forest(n_trees=2, children=3, depth=2, seed=4)
    a, b = weights["t0_0"], weights["t0_1"]
    ramp = dict(zip(sorted(a), np.linspace(0.2, 0.8, len(a)).tolist()))  # mergekit's layer gradient
    weights["ramp"] = {k: ramp[k] * a[k] + (1 - ramp[k]) * b[k] for k in a}
    forest = recover_lineage(weights, stage="specialize")
    rec = forest.decisions["model_merges"]["ramp"]
    first = dict(zip(rec["parents"], [1, 0]))["t0_0"]  # the per-layer weights are the first parent's
    got = rec["per_layer"] if first else [1 - t for t in rec["per_layer"]]
    assert got == pytest.approx([ramp[k] for k in sorted(a) if a[k].ndim == 2 and a[k].shape[0] == a[k].shape[1]],
                                abs=1e-3)
    plain = recover_lineage({k: v for k, v in weights.items() if k in parents}, stage="specialize")
    assert {(e.parent, e.child) for e in forest.edges if e.kind != "merge"} == {(e.parent, e.child) for e in plain.edges}
    assert "ramp  (merge per layer: " in to_text(forest)


def test_float_models_beside_a_quantized_one_are_searched_for_merges(tmp_path):
    """A quantized stand-in in the group (a Q8_0 file of a base not given) kept every model from the search;
    now only it is left out, neither a merge nor a parent."""
    from safetensors.torch import save_file

    from modelatlas.zoo.gguf import quantized, save_gguf

    gen = torch.Generator().manual_seed(6)
    base = {k: torch.randn(64, 256, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}
    save_gguf(tmp_path / "base-q8_0.gguf", {k: quantized(v, "Q8_0") for k, v in base.items()})
    ft = [{k: v + 0.05 * torch.randn(64, 256, generator=gen) for k, v in base.items()} for _ in range(3)]
    for i, f in enumerate(ft):
        save_file(f, str(tmp_path / f"ft{i}.safetensors"))
    save_file({k: 0.4 * ft[0][k] + 0.6 * ft[1][k] for k in base}, str(tmp_path / "soup.safetensors"))
    forest = recover_lineage(sorted(tmp_path.iterdir()))
    assert list(forest.decisions["model_merges"]) == ["soup"]
    assert sorted(forest.decisions["model_merges"]["soup"]["parents"]) == ["ft0", "ft1"]


def test_stab_finds_the_weight_most_intervals_share():
    from modelatlas.lineage.merge_values import _stab

    x = torch.tensor([1.0, 2.0, -1.0, 1.0, 0.0])
    d = torch.tensor([0.5, 1.0, -0.5, 3.0, 0.0])  # w = 0.5 fits the first three; the fourth wants 3
    w = _stab(x, d, torch.full((5,), 0.01))
    assert w == pytest.approx(0.5, abs=0.011)


def make_bf16_pair(seed: int = 0, n: int = 256):
    """Two bfloat16 tensors a few units in the last place apart (fine-tunes of one large model)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen).bfloat16()
    b = (a.float() * (1 + 0.01 * torch.randn(n, n, generator=gen))).bfloat16()
    return a, b


def test_a_merge_of_bfloat16_parents_is_on_their_grid_where_least_squares_is_not():
    from modelatlas.lineage.merge_values import _sampled, _within_ulp

    a, b = make_bf16_pair()
    m = (0.767 * a.float() + 0.233 * b.float()).bfloat16()
    y, pa, pb = _sampled(m), _sampled(a), _sampled(b)
    assert float(_within_ulp(y, [pa, pb], 7).double().mean()) >= 0.999
    x = (pa - pb)[:, None]
    w = float(torch.linalg.lstsq(x, (y - pb)[:, None]).solution)
    assert abs(w - 0.767) > 1e-3  # the rounding is a function of the grid gap: least squares is off
    other = (a.float() + 0.004 * torch.randn(256, 256, generator=torch.Generator().manual_seed(9))).bfloat16()
    assert float(_within_ulp(_sampled(other), [pa, pb], 7).double().mean()) < 0.9  # a fine-tune of a is none


def test_bfloat16_merges_of_bfloat16_fine_tunes_are_found(tmp_path):
    a, b = make_bf16_pair(1)
    gen = torch.Generator().manual_seed(3)
    base = {f"l{i}.weight": (a.float() * (1 + 0.01 * torch.randn(256, 256, generator=gen))).bfloat16() for i in range(2)}
    fts = [{k: (v.float() * (1 + 0.01 * torch.randn(256, 256, generator=gen))).bfloat16() for k, v in base.items()}
           for _ in range(3)]
    models = {"base": base, **{f"ft{i}": f for i, f in enumerate(fts)}}
    models["soup"] = {k: (0.5 * fts[0][k].float() + 0.5 * fts[1][k].float()).bfloat16() for k in base}
    models["ta"] = {k: (base[k].float() + 0.7 * (fts[1][k].float() - base[k].float())
                        + 0.9 * (fts[2][k].float() - base[k].float())).bfloat16() for k in base}
    forest = recover_lineage(models, stage="specialize")
    found = forest.decisions["model_merges"]
    assert set(found) == {"soup", "ta"} and sorted(found["soup"]["parents"]) == ["ft0", "ft1"]
    assert sorted(found["ta"]["parents"]) == ["base", "ft1", "ft2"]


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Spherical interpolation of two tensors as flat vectors, t the weight of b, computed in ``dtype``."""
    fa, fb = a.flatten().to(dtype), b.flatten().to(dtype)
    theta = torch.arccos((fa @ fb / (fa.norm() * fb.norm())).clamp(-1, 1))
    return ((torch.sin((1 - t) * theta) * fa + torch.sin(t * theta) * fb) / torch.sin(theta)).view(a.shape).float()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_slerp_of_far_apart_tensors_is_found_by_its_values(dtype):
    weights, parents = make_synthetic_forest(n_trees=2, children=3, depth=2, seed=4, step=0.3)
    a, b = weights["t0_0"], weights["t0_1"]
    fa, fb = a["attn.q"].flatten(), b["attn.q"].flatten()
    assert torch.rad2deg(torch.arccos(fa @ fb / (fa.norm() * fb.norm()))) > 10  # off the chord by ~3 %
    ramp = dict(zip(sorted(a), np.linspace(0.2, 0.8, len(a)).tolist()))
    weights["sl"] = {k: slerp(ramp[k], a[k], b[k], dtype) for k in a}
    forest = recover_lineage(weights, stage="specialize")
    assert sorted(forest.decisions["model_merges"]["sl"]["parents"]) == ["t0_0", "t0_1"]
    plain = recover_lineage({k: v for k, v in weights.items() if k in parents}, stage="specialize")
    assert {(e.parent, e.child) for e in forest.edges if e.kind != "merge"} == {(e.parent, e.child) for e in plain.edges}


@pytest.mark.parametrize("step", [0.05, 0.1])  # tensor pairs 2-5 and 6-9 degrees apart
def test_a_bfloat16_slerp_merge_near_its_chord_is_found_by_its_values(step):
    # mergekit's SLERP, one t, saved in bfloat16 (its default): the rounding hides the curve, so the distances
    # take it for a line merge, and its values are no one weighted sum (SLERP's weights differ per tensor)
    weights, parents = make_synthetic_forest(n_trees=2, children=3, depth=2, seed=4, step=step)
    a, b = weights["t0_0"], weights["t0_1"]
    weights["sl"] = {k: slerp(0.45, a[k], b[k]).bfloat16() for k in a}
    forest = recover_lineage(weights, stage="specialize")
    assert sorted(forest.decisions["model_merges"]["sl"]["parents"]) == ["t0_0", "t0_1"]
    plain = recover_lineage({k: v for k, v in weights.items() if k in parents}, stage="specialize")
    assert {(e.parent, e.child) for e in forest.edges if e.kind != "merge"} == {(e.parent, e.child) for e in plain.edges}


@pytest.mark.parametrize("ends", [(0.45, 0.45), (0.25, 0.7)])
def test_a_slerp_merge_found_by_its_values_records_its_weights_and_t_per_tensor(ends):
    # the per-tensor SLERP check fits a A + b B per sampled tensor; the record had only the line's one pair
    weights, parents = make_synthetic_forest(n_trees=2, children=3, depth=2, seed=4, step=0.1)
    a, b = weights["t0_0"], weights["t0_1"]
    ramp = dict(zip(sorted(a), np.linspace(*ends, len(a)).tolist()))  # t, the weight of t0_1, per tensor
    weights["sl"] = {k: slerp(ramp[k], a[k], b[k]).bfloat16() for k in a}
    rec = recover_lineage(weights, stage="specialize").decisions["model_merges"]["sl"]
    assert sorted(rec["parents"]) == ["t0_0", "t0_1"] and len(rec["weights"]) == 2  # the old fields stay
    second = rec["parents"][1] == "t0_1"
    assert sorted(rec["per_tensor"]) == sorted(a)  # every 2-D tensor the check samples (up to 8)
    for name, fit in rec["per_tensor"].items():
        want = ramp[name] if second else 1 - ramp[name]
        assert abs(fit["t"] - want) < 0.01 and len(fit["weights"]) == 2
        assert abs(sum(fit["weights"]) - 1) < 0.01  # SLERP's a + b: a little over 1 for tensors a few degrees apart


def test_a_bfloat16_task_arithmetic_merge_whose_base_weighs_little_is_found_with_its_base():
    # P + 0.68 (A - P) + 0.30 (B - P): the base weighs 0.02, so the merge lies near the line A-B too; rounded, that
    # line fits its distances, and only its values tell the plane
    weights, parents = make_synthetic_forest(n_trees=2, children=3, depth=2, seed=4, step=0.1)
    p, a, b = weights["t0"], weights["t0_0"], weights["t0_1"]
    weights["ta"] = {k: (p[k] + 0.68 * (a[k] - p[k]) + 0.30 * (b[k] - p[k])).bfloat16() for k in p}
    forest = recover_lineage(weights, stage="specialize")
    got = forest.decisions["model_merges"]["ta"]
    assert dict(zip(got["parents"], np.round(got["weights"], 2))) == {"t0": 0.02, "t0_0": 0.68, "t0_1": 0.30}
    plain = recover_lineage({k: v for k, v in weights.items() if k in parents}, stage="specialize")
    assert {(e.parent, e.child) for e in forest.edges if e.kind != "merge"} == {(e.parent, e.child) for e in plain.edges}


def make_bf16_run(seed: int, n: int = 8, dim: int = 128) -> dict:
    """``n`` bfloat16 checkpoints of one slow run: each save moves ~15 % of the values by one unit in the last
    place (drift 0.001 and noise 0.0001 of the weights' scale, learning rate decaying 0.8 a save)."""
    gen = torch.Generator().manual_seed(seed)
    w = {f"l{i}": torch.randn(dim, dim, generator=gen) / dim**0.5 for i in range(3)}
    drift = {k: torch.randn(dim, dim, generator=gen) / dim**0.5 for k in w}
    out = {"c0": {k: v.bfloat16() for k, v in w.items()}}
    for s in range(1, n):
        step = 0.8**s
        w = {k: v + step * (0.001 * drift[k] + 0.0001 * torch.randn(dim, dim, generator=gen) / dim**0.5)
             for k, v in w.items()}
        out[f"c{s}"] = {k: v.bfloat16() for k, v in w.items()}
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_checkpoints_a_unit_apart_are_no_merges(seed):
    # a value one unit from both neighbours lies within half a unit of their 50/50 mix, and equals one of them
    # as a TIES merge's values do: 2-3 checkpoints a run were taken for merges (weighted or TIES)
    forest = recover_lineage(make_bf16_run(seed), stage="specialize")
    assert forest.decisions.get("model_merges", {}) == {}


def test_sampled_rows_are_read_once_a_model_and_kept_within_their_budget():
    from modelatlas.lineage.merge_values import SampledRows, read_sampled, verify_grid
    from modelatlas.lineage.sources import MemoryCheckpoint

    gen = torch.Generator().manual_seed(0)
    members = [MemoryCheckpoint(f"m{i}", {"w": torch.randn(100, 8, generator=gen), "b": torch.randn(8)})
               for i in range(3)]
    reads = []
    for ck in members:
        real = ck.read_rows
        ck.read_rows = lambda name, rows, real=real, ck=ck: reads.append(ck.name) or real(name, rows)
    grid = verify_grid(members[0].tensors())
    rows = SampledRows(members, grid, budget=2 * 64 * 8 * 8)  # two models' 64 rows of 8 float64 values
    assert [t.name for t in grid] == ["w"] and torch.equal(rows(members[1], grid[0]), read_sampled(members[1], grid[0]))
    for i in (0, 1, 0, 1):
        rows.values(i)
    assert reads == ["m1", "m1", "m0"]  # read_sampled above, then each once
    rows.values(2)  # over the budget: m0, the least recently used, goes
    rows.values(0)  # read again; m1 goes
    rows.values(2)
    assert reads == ["m1", "m1", "m0", "m2", "m0"]

"""TIES / DARE merges (lineage.sparse_merges): found value by value after screens on the distances and on a few
values, with their base and two models; fine-tunes, checkpoints of one run and weighted sums are not."""

import numpy as np
import torch

from modelatlas.lineage import recover_lineage
from modelatlas.lineage.export import to_text
from modelatlas.lineage.sparse_merges import (
    MIN_EQUAL,
    SparseMerge,
    _dare_kind,
    _dare_scales,
    _disjoint,
    _kind,
    _order,
    _rank,
    _ratio_modes,
    _value_screen,
    classify,
    find_sparse_merges,
)
from modelatlas.zoo.sparse_merged import sparse_merge


def make_family(seed: int = 0, dim: int = 4096) -> dict[str, np.ndarray]:
    """A base P (float32 values), fine-tunes A, B, D of it and C of A (updates of 10 % of the weights' RMS)."""
    rng = np.random.default_rng(seed)
    p = rng.normal(size=dim).astype(np.float32)
    a, b, d = (p + (0.1 * rng.normal(size=dim)).astype(np.float32) for _ in range(3))
    c = a + (0.1 * rng.normal(size=dim)).astype(np.float32)
    return {"P": p, "A": a, "B": b, "C": c, "D": d}


def make_merge(fam: dict, kind: str, weights=(0.6, 0.4), density: float = 0.5, seed: int = 1) -> np.ndarray:
    """mergekit's ``kind`` of A and B on P (:mod:`modelatlas.zoo.sparse_merged`), stored float32."""
    t = {k: torch.from_numpy(v.astype(np.float64)) for k, v in fam.items()}
    merge = {"kind": kind, "weights": [0.0, *weights], "density": density}
    return sparse_merge(merge, t["P"], [t["A"], t["B"]], torch.Generator().manual_seed(seed)).float().numpy()


def check_found(points: dict) -> dict:
    """name -> (parent names, kind) of the sparse merges found among ``points`` (exact squared distances)."""
    names = list(points)
    x = np.stack([points[n] for n in names]).astype(np.float64)  # (N, dim)
    sq = ((x[:, None] - x[None]) ** 2).sum(-1)  # (N, N)
    half = lambda i: 4 * np.ldexp(1.0, np.frexp(np.abs(x[i]))[1] - 24)  # noqa: E731  (4 float32 ulps)
    found = find_sparse_merges(sq, list(range(len(names))), lambda i: x[i][::16], lambda i: x[i], half)
    return {names[f.child]: (tuple(names[p] for p in f.parents), f.kind) for f in found}


def test_classify_by_hand():
    p = np.zeros(8)
    a = np.array([3, -1, 0.5, -4, 2, 0.1, 5, 0])
    b = np.array([1.5, 2, -3, -0.2, -1, 0.05, -12, 0])
    ties = np.array([2.5, 2, -3, -4, 2, 0, -12, 0])  # tests/zoo/test_sparse_merged.py: TIES at density 0.5, (1, 0.5)
    (alpha, beta, gamma, eta), share = classify(ties, p, a, b, np.full(8, 1e-9), least=1)
    # 0 (twice), A's own (-4, 2), B's own (2, -3, -12): 6 of the 7 moved values; the one both kept,
    # (2/3) 3 + (1/3) 1.5 = 2.5, is left (one value fixes no pair of weights)
    assert (round(alpha, 6), round(beta, 6), share) == (1.0, 1.0, 6 / 7)
    assert classify(p, p, p, p, np.ones(8), least=1) is None  # nothing moved
    assert classify(ties, p, a, b, np.full(8, 1e-9)) is None  # 7 values moved: too few to tell (MIN_TELLING)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 400))
    kind = np.arange(400) % 4  # 0: both dropped, 1: A's kept, 2: B's, 3: both (alpha 2, beta 3)
    dare = np.select([kind == 1, kind == 2, kind == 3], [2 * a, 3 * b, 2 * a + 3 * b], 0.0)
    (alpha, beta, gamma, eta), share = classify(dare, np.zeros(400), a, b, np.full(400, 1e-9))
    assert np.allclose([alpha, beta, gamma, eta], [2, 3, 2, 3]) and share == 1.0
    noise = dare + 0.01 * rng.normal(size=400)
    assert classify(noise, np.zeros(400), a, b, np.full(400, 1e-9))[1] < 0.05  # a fine-tune: nothing classed
    assert _kind((1, 1, 0.6, 0.4)) == "ties" and _kind((2, 3, 2, 3)) == "dare" and _kind((1, 2, 0.5, 0.1)) == "sparse"


def test_dare_scales_read_the_density_from_the_energy():
    # |tau_A| = |tau_B| = 1, orthogonal, weights 0.5: E|M - P|^2 = (0.25 + 0.25) / d = 1 at d = 0.5
    alpha, beta = _dare_scales(np.array([1.0]), np.array([0.5]), np.array([0.5]), 1.0, 1.0, 0.0)
    assert np.allclose([alpha, beta], [1.0, 1.0])
    alpha, _ = _dare_scales(np.array([0.25]), np.array([0.5]), np.array([0.0]), 1.0, 1.0, 0.0)  # d = 1: no drops
    assert np.allclose(alpha, 0.5)
    assert np.isnan(_dare_scales(np.array([0.1]), np.array([0.5]), np.array([0.5]), 1.0, 1.0, 0.0)[0])  # d = 5


def test_value_screen_by_hand():
    m = np.array([1.0, 2.0, 0.0, 1.5])
    x = np.array([[[0, 0, 0, 0], [1, 2, 1, 1], [3, 0, 2, 2]]], dtype=float)  # (1, 3, 4): P, A, B
    # A's, A's, P's, between A's and B's: all TIES's
    assert _value_screen(m, x, np.array([np.nan]), np.array([np.nan])).tolist() == [1.0]
    assert _value_screen(m + 0.01, x, np.array([np.nan]), np.array([np.nan])).tolist() == [0.0]  # equal to none
    assert MIN_EQUAL < 0.25


def test_value_screen_reads_dare_scales_off_the_values_where_the_distances_misjudge_them():
    # DARE-TIES drops the smaller of two kept deltas that disagree in sign, so the energy the distances read its
    # density from is off (alpha 0.66 for 0.81: a held-out zoo's merge missed), as the drops' chance can be for
    # DARE-linear (alpha 1.22 for 1.05, a CNN's): the scale only one kept model's values share is exact
    rng = np.random.default_rng(0)
    p, a, b = np.zeros(256), rng.normal(size=256), rng.normal(size=256)
    kept = rng.random((2, 256)) < 0.5
    m = 2 * a * kept[0] + 3 * b * kept[1]  # DARE-linear, alpha 2, beta 3
    x = np.stack([p, a, b])[None]  # (1, 3, 256)
    assert _value_screen(m, x, np.array([2.0]), np.array([3.0])).tolist() == [1.0]
    assert _value_screen(m, x, np.array([2.5]), np.array([3.6])).tolist() == [1.0]  # 25 % and 20 % off
    assert abs(_ratio_modes(m[None], a[None])[0] - 2) < 0.01 and np.isnan(_ratio_modes(np.zeros((1, 4)), np.ones((1, 4))))[0]


def test_ties_and_dare_merges_are_found_with_base_and_models():
    fam = make_family()
    fam["ties"] = make_merge(fam, "ties")
    fam["dare"] = make_merge(fam, "dare_linear", (0.7, 0.5), 0.4)
    found = check_found(fam)
    assert found == {"ties": (("P", "A", "B"), "ties"), "dare": (("P", "A", "B"), "dare_linear")}
    fam = make_family(1)
    fam["dt"] = make_merge(fam, "dare_ties", (0.5, 0.5), 0.6)
    # a sign disagreeing keeps the elected side alone: the same classes as DARE's, told by where they fall
    assert check_found(fam) == {"dt": (("P", "A", "B"), "dare_ties")}


def test_dare_ties_and_dare_linear_are_told_by_the_values_whose_deltas_disagree_in_sign():
    for seed, density in ((2, 0.3), (3, 0.7)):
        fam = make_family(seed)
        for kind in ("dare_linear", "dare_ties"):
            m = make_merge(fam, kind, (0.8, 0.4), density, seed)
            half = np.full(len(m), 1e-6)
            scales = (0.8 / density, 0.4 / density)  # DARE: weight / density
            assert _dare_kind(m.astype(np.float64), fam["P"], fam["A"], fam["B"], half, scales) == kind
    fam = make_family(4, dim=96)  # too few values where deltas disagree in sign and one is kept (~36 of 96): untold
    m = make_merge(fam, "dare_linear", (0.5, 0.5), 0.5)
    assert _dare_kind(m.astype(np.float64), fam["P"], fam["A"], fam["B"], np.full(96, 1e-6), (1.0, 1.0)) == "dare"


def test_fine_tunes_and_weighted_sums_are_no_sparse_merge():
    fam = make_family()
    fam["soup"] = (0.5 * fam["A"] + 0.5 * fam["B"]).astype(np.float32)
    fam["ta"] = (fam["P"] + 0.8 * (fam["A"] - fam["P"]) + 0.6 * (fam["B"] - fam["P"])).astype(np.float32)
    assert check_found(fam) == {}
    walk = [np.random.default_rng(0).normal(size=2048).astype(np.float32)]
    for i in range(11):
        walk.append(walk[-1] + (0.01 * np.random.default_rng(i + 1).normal(size=2048)).astype(np.float32))
    assert check_found({f"c{i}": w for i, w in enumerate(walk)}) == {}


def test_disjoint_keeps_one_fit_a_model_and_no_merge_as_parent():
    def fit(child, parents, share, c=(1, 1, 0.5, 0.5)):
        return SparseMerge(child, parents, c, share, _kind(c))

    fits = {5: [fit(5, (0, 1, 2), 1.0)], 6: [fit(6, (0, 5, 3), 0.999)], 1: [fit(1, (0, 3, 4), 0.995)],
            7: [fit(7, (0, 3, 4), 0.99)]}
    assert [f.child for f in _disjoint(fits)] == [5, 7]  # 6 takes merge 5 as a parent; 1 is a parent of 5
    # a merge whose best fit takes another merge as parent keeps its next fit (seed 82's t1.merge2)
    fits = {8: [fit(8, (2, 1, 9), 1.0, (0.4, 0.4, 1, 0)), fit(8, (0, 1, 2), 1.0)], 9: [fit(9, (2, 3, 4), 0.997)]}
    assert {f.child: f.parents for f in _disjoint({m: sorted(f, key=_rank) for m, f in fits.items()})} == \
        {8: (0, 1, 2), 9: (2, 3, 4)}


def test_a_base_the_values_cannot_tell_is_the_one_between_the_models():
    fits = [SparseMerge(9, (p, 1, 2), (1, 1, 0.5, 0.5), share, "ties") for p, share in ((3, 1.0), (0, 0.9997), (4, 0.99))]
    sq = np.zeros((10, 10))
    sq[[0, 3, 4], 1] = sq[[0, 3, 4], 2] = 1.0, 1.5, 0.1  # base 0: 2 to both models, 3: 3; 4: 0.2, but 1 % fewer classed
    sq[9, [3, 0]] = 0.1, 0.2  # nearer the merge: base 3 (a child of a model, seed 88)
    assert [f.parents[0] for f in _order(fits, sq)] == [0, 3, 4]


def test_recovery_places_a_ties_merge_under_its_main_parent():
    fam = {k: make_family(s) for k, s in (("w1", 0), ("w2", 1))}  # two layers, each its own family
    models = {n: {k: torch.from_numpy(fam[k][n].copy()).view(64, 64) for k in fam} for n in fam["w1"]}
    ties = {k: make_merge(fam[k], "ties", (0.7, 0.3)) for k in fam}
    models["M"] = {k: torch.from_numpy(v).view(64, 64) for k, v in ties.items()}
    forest = recover_lineage(models)
    rec = forest.decisions["model_merges"]["M"]
    assert rec["parents"] == ["P", "A", "B"] and rec["weights"] is None and rec["kind"] == "ties"
    assert [(e.parent, e.kind) for e in forest.edges if e.child == "M"] == [("A", "merge")]  # A: weight 0.7
    assert 0.69 < rec["coefficients"][2] < 0.71  # A's share where both kept: 0.7 / (0.7 + 0.3)
    assert "M  (ties merge of P, A, B (base first; from its values))" in to_text(forest)


def test_a_triple_that_fails_on_a_few_values_is_not_fitted_whole(monkeypatch):
    # 130 screened triples of 8 bfloat16 fine-tunes of one base were each fitted on all their ~260k values (57 s)
    import modelatlas.lineage.sparse_merges as S

    rng = np.random.default_rng(0)
    p, a, b, m = rng.normal(size=(4, 20_000))  # m is no merge of a and b on p
    sizes = []
    real = S.classify
    monkeypatch.setattr(S, "classify", lambda *args, **kw: sizes.append(len(args[0])) or real(*args, **kw))
    got = S._classified([m, p, a, b], np.full(20_000, 1e-9))
    assert got is not None and got[1] < S.SPARSE_SHARE and sizes == [S.PRECHECKS[0]]  # the smallest stage says no
    dare = np.where(rng.random(20_000) < 0.5, 2 * (a - p), 0.0) + p  # a DARE-like merge: fitted whole
    sizes.clear()
    assert S._classified([dare, p, a, b], np.full(20_000, 1e-9))[1] > S.SPARSE_SHARE and sizes == [*S.PRECHECKS, 20_000]


def test_the_value_checks_read_each_models_sampled_rows_once(monkeypatch):
    # the weighted-sum check (a SLERP merge's values) and the TIES fit read the same rows of the same models: over
    # HTTP each read is requests and bytes (session 36: 224 requests, 109 MB, against 168 and 80 MB without the fit)
    from modelatlas.lineage.synthetic import make_synthetic_forest
    from modelatlas.weights.base import Checkpoint

    weights, _ = make_synthetic_forest(n_trees=2, children=3, depth=2, seed=4, step=0.3)
    a, b, p = weights["t0_0"], weights["t0_1"], weights["t0"]
    weights["sl"] = {k: torch.lerp(a[k], b[k], 0.5) * 1.02 for k in a}  # off the chord: checked by its values
    merge = {"kind": "ties", "weights": [0.0, 0.6, 0.4], "density": 0.5}
    weights["ti"] = {k: sparse_merge(merge, p[k].double(), [a[k].double(), b[k].double()], torch.Generator()).float()
                     for k in a}
    reads = []
    real = Checkpoint.read_rows
    monkeypatch.setattr(Checkpoint, "read_rows", lambda self, name, rows: reads.append((self.name, name)) or
                        real(self, name, rows))
    found = recover_lineage(weights, stage="specialize").decisions["model_merges"]
    assert sorted(found["sl"]["parents"]) == ["t0_0", "t0_1"] and found["ti"]["parents"] == ["t0", "t0_0", "t0_1"]
    assert ("t0_0", "attn.q") in reads and len(reads) == len(set(reads))  # t0_0's: read for both merges, once


def test_the_value_screen_reads_every_value_only_for_triples_that_pass_a_quarter_of_them(monkeypatch):
    # trained zoos' models share many exact values (dead units), so most triples reach the value screen: a
    # 200-model zoo without merges screened 45,093 triples on all their values, every one failing (0.3 s)
    import modelatlas.lineage.sparse_merges as S

    fam = make_family(dim=1024)
    fam["D"] = fam["D"].copy()
    fam["D"][::3] = fam["P"][::3]  # D, no merge, equals P on a third of the values
    fam["M"] = make_merge(fam, "ties", (0.7, 0.3), density=0.4)
    names = ["P", "A", "B", "C", "D"]
    sub = np.stack([fam[n] for n in names]).astype(np.float64)  # (k, S)
    trip = np.array([[0, 1, 2]])  # (P, A, B)
    sizes = []
    real = S._value_screen
    monkeypatch.setattr(S, "_value_screen", lambda mv, *a, **kw: sizes.append(len(mv)) or real(mv, *a, **kw))
    no = S._staged_screen(fam["D"].astype(np.float64), sub, trip, np.ones(1), np.ones(1))
    assert no[0] == 0 and sizes == [1024 // S.STAGE]  # D is no merge of A and B: the quarter says so
    sizes.clear()
    yes = S._staged_screen(fam["M"].astype(np.float64), sub, trip, np.ones(1), np.ones(1))
    assert yes[0] >= S.SCREEN_SHARE and sizes == [1024 // S.STAGE, 1024]  # TIES of A and B on P: all read

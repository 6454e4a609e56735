"""mergekit's sparse merges of one tensor (TIES, DARE), checked by hand."""

import torch

from modelatlas.zoo.sparse_merged import drop, sparse_merge, trim

P = torch.ones(8, dtype=torch.float64)
TAU_A = torch.tensor([3, -1, 0.5, -4, 2, 0.1, 5, 0], dtype=torch.float64)
TAU_B = torch.tensor([1.5, 2, -3, -0.2, -1, 0.05, -12, 0], dtype=torch.float64)


def make_merge(kind, density, weights=(1.0, 0.5)):
    return {"kind": kind, "weights": [0.0, *weights], "density": density}


def test_ties_by_hand():
    # density 0.5 keeps 4 of 8: A' = [3,0,0,-4,2,0,5,0], B' = [1.5,2,-3,0,0,0,-12,0]; weighted sum (1, 0.5)
    # [3.75,1,-1.5,-4,2,0,-1,0] elects + + - - + + - +; the agreeing values' weighted mean: (3 + 0.75) / 1.5,
    # B's own 2 and -3, A's own -4 and 2, nothing, B's -12 (A's 5 disagrees), nothing
    got = sparse_merge(make_merge("ties", 0.5), P, [P + TAU_A, P + TAU_B], torch.Generator())
    assert torch.allclose(got - P, torch.tensor([2.5, 2, -3, -4, 2, 0, -12, 0], dtype=torch.float64))
    assert torch.equal(trim(TAU_A, 0.5), torch.tensor([3, 0, 0, -4, 2, 0, 5, 0], dtype=torch.float64))
    assert torch.count_nonzero(trim(TAU_A, 0.01)) == 1  # at least one value kept


def test_dare_by_hand():
    a, b = P + TAU_A, P + TAU_B
    lin = sparse_merge(make_merge("dare_linear", 1.0, (0.5, 0.25)), P, [a, b], torch.Generator())
    assert torch.allclose(lin, P + 0.5 * TAU_A + 0.25 * TAU_B)  # density 1 drops nothing: task arithmetic
    ties = sparse_merge(make_merge("dare_ties", 1.0), P, [a, b], torch.Generator())
    # weighted sum [3.75,1,-1.5,-4.1,1.5,0.125,-1,0]: agreeing values summed, not averaged
    assert torch.allclose(ties - P, torch.tensor([3.75, 1, -1.5, -4.1, 2, 0.125, -6, 0], dtype=torch.float64))
    half = sparse_merge(make_merge("dare_linear", 0.5), P, [a, b], torch.Generator().manual_seed(3))
    again = sparse_merge(make_merge("dare_linear", 0.5), P, [a, b], torch.Generator().manual_seed(3))
    assert torch.equal(half, again)  # seeded
    kept = drop(torch.ones(10_000, dtype=torch.float64), 0.25, torch.Generator().manual_seed(0))
    assert set(kept.unique().tolist()) == {0.0, 4.0} and abs(kept.mean().item() - 1) < 0.05  # rescaled by 1/d


def test_zoo_show_writes_a_sparse_merge_as_weights_on_its_base():
    from modelatlas.cli.zoo import merge_text

    rec = {"kind": "ties", "parents": ["t0", "t0.0", "t0.1"], "weights": [0.0, 0.6, 0.3], "density": 0.4}
    assert merge_text(rec) == "ties (density 0.40) on t0: 0.60 t0.0 + 0.30 t0.1"  # not "0.00 t0 + ...": no sum
    assert merge_text({"kind": "linear", "parents": ["a", "b"], "weights": [0.25, 0.75]}) == "linear: 0.25 a + 0.75 b"

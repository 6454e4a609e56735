import itertools

import networkx as nx
import numpy as np
import pytest

from modelatlas.lineage.edmonds import arborescence_cost, minimum_spanning_arborescence


def brute_force(cost):
    """Cheapest single-root arborescence by enumerating every parent assignment (n <= 6)."""
    n = len(cost)
    best = np.inf
    for par in itertools.product(range(-1, n), repeat=n):
        if sum(p == -1 for p in par) != 1 or any(p == v for v, p in enumerate(par)):
            continue
        if all(check_reaches_root(par, v) for v in range(n)):
            best = min(best, sum(cost[p, v] for v, p in enumerate(par) if p >= 0))
    return best


def check_reaches_root(par, v):
    seen = set()
    while v != -1:
        if v in seen:
            return False
        seen.add(v)
        v = par[v]
    return True


def test_hand_checked_cycle_contraction():
    # Cheapest in-edges 1->2 and 2->1 form a cycle; it must be broken by entering from 0.
    c = np.array([[np.inf, 5.0, 6.0], [np.inf, np.inf, 1.0], [np.inf, 1.0, np.inf]])
    parent = minimum_spanning_arborescence(c)
    assert parent == [-1, 0, 1]
    assert arborescence_cost(c, parent) == 6.0


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    cost = rng.random((n, n))
    parent = minimum_spanning_arborescence(cost)
    assert sum(p == -1 for p in parent) == 1
    assert all(check_reaches_root(parent, v) for v in range(n))
    assert arborescence_cost(cost, parent) == pytest.approx(brute_force(cost))


@pytest.mark.parametrize("seed", range(10))
def test_matches_networkx(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 40))
    cost = rng.random((n, n))
    g = nx.DiGraph()
    g.add_weighted_edges_from((u, v, cost[u, v]) for u in range(n) for v in range(n) if u != v)
    ref = nx.minimum_spanning_arborescence(g)
    expected = sum(d["weight"] for _, _, d in ref.edges(data=True))
    assert arborescence_cost(cost, minimum_spanning_arborescence(cost)) == pytest.approx(expected)


def test_forbidden_edges_make_extra_roots():
    inf = np.inf
    c = np.array([[inf, 1.0, inf], [inf, inf, inf], [inf, inf, inf]])
    assert minimum_spanning_arborescence(c) == [-1, 0, -1]


def test_empty_and_non_square():
    assert minimum_spanning_arborescence(np.zeros((0, 0))) == []
    with pytest.raises(ValueError, match="square"):
        minimum_spanning_arborescence(np.zeros((2, 3)))


def test_many_contractions_do_not_hit_the_recursion_limit():
    """Pairs of mutual nearest neighbours on a line: every pair is a 2-cycle, contracted one at a time, so
    the recursive form needed one Python frame per contraction (a RecursionError past ~1000 models)."""
    import inspect
    import sys

    from scipy.sparse.csgraph import minimum_spanning_tree

    pos = np.repeat(np.arange(150) * 10.0, 2) + np.tile([0.0, 0.1], 150)  # 300 points, 150 tight pairs
    sym = np.abs(pos[:, None] - pos[None, :])
    bias = np.linspace(0, 1e-3, 300)  # cost[u, v] = |u - v| + bias[v]: every non-root node pays its bias once
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack(0)) + 100)  # fewer frames than the 150+ contractions
    try:
        parent = minimum_spanning_arborescence(sym + bias[None, :])
    finally:
        sys.setrecursionlimit(limit)
    # oracle: the undirected MST oriented from the node with the largest bias (the one that pays none)
    expected = minimum_spanning_tree(sym).sum() + bias.sum() - bias.max()
    assert arborescence_cost(sym + bias[None, :], parent) == pytest.approx(expected)

import numpy as np
import pytest

from modelatlas.errors import ConfigError
from modelatlas.lineage.config import LineageConfig
from modelatlas.lineage.orient import _root_at, orient_mst, orient_votes, prim_mst
from modelatlas.lineage.root import branching, choose_root, edge_votes, hop_sums, root_scores


def make_chain_adj(n):
    return [[v for v in (u - 1, u + 1) if 0 <= v < n] for u in range(n)]


def make_branching_adj():
    """root 0 with children 1, 2, 3; each child has two children (4..9): a 3 x 2 x depth-2 tree."""
    edges = [(0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (2, 6), (2, 7), (3, 8), (3, 9)]
    adj = [[] for _ in range(10)]
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    return adj


def check_brute_force_scores(adj, k, lk, stage, prior, votes="sign"):
    vote = edge_votes(adj, k, lk, stage, votes)
    hops = hop_sums(adj)
    n = len(adj)
    brute = []
    for r in range(n):
        parent = _root_at(adj, r)
        b = branching(adj)
        brute.append(sum(vote[(p, c)] for c, p in enumerate(parent) if p >= 0) - prior * b * hops[r] / (n - 1))
    np.testing.assert_allclose(root_scores(adj, k, lk, stage, prior, votes), brute, atol=1e-12)


@pytest.mark.parametrize("stage", ["generalize", "specialize"])
def test_chain_with_consistent_kurtosis_is_read_from_its_end_despite_the_prior(stage):
    n = 7
    rising = np.arange(n, dtype=float)[:, None] * np.array([0.01, 0.02, 0.005])  # (n, 3): every layer rises
    lk = rising if stage == "generalize" else -rising
    root, conf, _ = choose_root(make_chain_adj(n), lk.sum(1), lk, stage, prior=2.0, votes="sign")
    assert root == 0  # a chain does not branch: no centrality prior, the votes decide
    assert conf > 0.85
    root, conf, _ = choose_root(make_chain_adj(n), lk.sum(1), lk, stage, prior=2.0)  # scaled: each edge tanh(1)
    assert root == 0 and conf == pytest.approx(1 / (1 + np.exp(-2 * np.tanh(1.0))))


def test_flat_kurtosis_lets_structure_pick_the_branching_root():
    adj = make_branching_adj()
    lk = np.zeros((10, 3))
    root, conf, second = choose_root(adj, lk.sum(1), lk, "generalize")
    assert root == 0 and second in (1, 2, 3)
    assert 0.5 < conf < 0.8  # structure alone is weak evidence


def test_flat_kurtosis_chain_is_a_coin_flip():
    _, conf, _ = choose_root(make_chain_adj(6), np.zeros(6), np.zeros((6, 2)), "generalize")
    assert conf == pytest.approx(0.5)  # no votes, no shape evidence


def test_branching_fraction():
    assert branching(make_chain_adj(5)) == 0.0
    assert branching(make_branching_adj()) == 1.0
    assert branching([[1], [0, 2], [1, 3, 4], [2], [2]]) == 0.5  # inner nodes 1 (deg 2) and 2 (deg 3)


def test_star_hub_is_the_root():
    adj = [[1, 2, 3, 4], [0], [0], [0], [0]]
    lk = np.array([[0.0, 0.0, 0.0], [0.1, 0.1, -0.1], [0.1, 0.2, 0.1], [0.2, 0.1, 0.1], [0.1, -0.1, 0.1]])
    assert choose_root(adj, lk.sum(1), lk, "generalize", prior=0.0)[0] == 0
    assert choose_root(adj, lk.sum(1), lk, "generalize")[0] == 0


def test_layer_votes_outvote_one_layer_with_a_large_swing():
    """a - b - c: layers 1 and 2 rise a < b < c a little; layer 0 falls a lot. Summed kurtosis reads the
    chain backwards (generalize: root = lowest sum = c); the layers' majority reads it from a."""
    d = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=float)
    lk = np.array([[1.0, 0.00, 0.00], [0.5, 0.01, 0.01], [0.0, 0.02, 0.02]])  # (3 models, 3 layers)
    assert orient_mst(d, lk.sum(1), "generalize") == [1, 2, -1]
    parent, conf, second = orient_votes(d, lk.sum(1), lk, "generalize", prior=0.0, votes="sign")
    assert parent == [-1, 0, 1] and conf > 0.6 and second == 1


def test_root_scores_match_brute_force_on_random_trees():
    rng = np.random.default_rng(0)
    for n in (2, 5, 12):
        x = rng.normal(size=(n, 4))
        dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
        adj = prim_mst(dist)
        lk = rng.normal(size=(n, 3))
        for stage in ("generalize", "specialize"):
            check_brute_force_scores(adj, lk.sum(1), lk, stage, prior=2.0)
            check_brute_force_scores(adj, lk.sum(1), None, stage, prior=0.5)
            check_brute_force_scores(adj, lk.sum(1), lk, stage, prior=2.0, votes="scaled")


def test_scaled_votes_by_hand():
    """Chain 0 - 1 - 2, generalize (a parent has less kurtosis). Layer 0 rises 0.1 then 0.3 (median 0.2);
    layer 1 rises 0.01 on the first edge and falls 0.03 on the second (median 0.02); layer 2 never changes."""
    lk = np.array([[0.0, 0.0, 5.0], [0.1, 0.01, 5.0], [0.4, -0.02, 5.0]])
    vote = edge_votes(make_chain_adj(3), lk.sum(1), lk, "generalize", "scaled")
    assert vote[(0, 1)] == pytest.approx((np.tanh(0.5) + np.tanh(0.5) + 0) / 3)
    assert vote[(1, 2)] == pytest.approx((np.tanh(1.5) - np.tanh(1.5) + 0) / 3)
    assert vote[(2, 1)] == -vote[(1, 2)]
    sign = edge_votes(make_chain_adj(3), lk.sum(1), lk, "generalize", "sign")
    assert sign[(0, 1)] == pytest.approx(2 / 3) and sign[(1, 2)] == 0.0


def test_scaled_votes_let_a_clear_edge_beat_noise_that_sign_votes_count_fully():
    """Root 0 with children 1, 2, 3, each with two children. On edge 0 - 1 two of three layers move
    against the stage by a noise-sized 0.001 and one moves with it by its typical amount: sign votes say
    1 -> 0 and take child 1 as the root; scaled votes keep 0."""
    adj = make_branching_adj()
    steps = {1: [-0.001, -0.001, 0.1]} | {c: [0.1, 0.1, 0.1] for c in range(2, 10)}  # generalize: k rises
    parent = _root_at(adj, 0)
    lk = np.zeros((10, 3))
    for c in range(1, 10):  # parents before children in index order
        lk[c] = lk[parent[c]] + steps[c]
    assert choose_root(adj, lk.sum(1), lk, "generalize", prior=0.0, votes="sign")[0] == 1
    assert choose_root(adj, lk.sum(1), lk, "generalize", prior=0.0)[0] == 0  # scaled, the default


def test_single_model_and_missing_layers():
    assert choose_root([[]], np.zeros(1), None, "generalize") == (0, 1.0, 0)
    root, conf, _ = choose_root(make_chain_adj(3), np.array([0.0, 1.0, 2.0]), np.zeros((3, 0)), "generalize", 0.0)
    assert root == 0 and 0.5 <= conf <= 1.0


def test_config_rejects_bad_orient_and_prior():
    with pytest.raises(ConfigError, match="orient must be one of votes, kurtosis"):
        LineageConfig(orient="centre")
    with pytest.raises(ConfigError, match="root_prior must be >= 0"):
        LineageConfig(root_prior=-1.0)
    with pytest.raises(ConfigError, match="root_votes must be one of sign, scaled"):
        LineageConfig(root_votes="tanh")


@pytest.mark.parametrize("seed", range(8))
def test_hop_sums_by_rerooting_match_one_bfs_per_node(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    adj = [[] for _ in range(n)]
    for v in range(1, n):  # a random tree
        u = int(rng.integers(0, v))
        adj[u].append(v)
        adj[v].append(u)
    brute = []
    for r in range(n):
        depth = {r: 0}
        queue = [r]
        for u in queue:
            for v in adj[u]:
                if v not in depth:
                    depth[v] = depth[u] + 1
                    queue.append(v)
        brute.append(sum(depth.values()))
    np.testing.assert_array_equal(hop_sums(adj), brute)


def test_hop_sums_refuse_a_graph_that_is_not_one_tree():
    with pytest.raises(ValueError, match="not one tree"):
        hop_sums([[1], [0], []])


def test_side_confidence_by_hand_on_a_chain():
    """Chain 0 - 1 - 2 hung from 0, root probabilities softmax(log [6, 3, 1]) = [0.6, 0.3, 0.1]: the edge
    0 -> 1 has 0.6 of the weight on its parent's side (2 * 0.6 - 1 = 0.2), the edge 1 -> 2 has 0.9 (0.8)."""
    from modelatlas.lineage.root import side_confidence

    conf = side_confidence(make_chain_adj(3), [-1, 0, 1], np.log([6.0, 3.0, 1.0]))
    assert conf == pytest.approx([1.0, 0.2, 0.8])
    hung_wrong = side_confidence(make_chain_adj(3), [1, 2, -1], np.log([6.0, 3.0, 1.0]))  # against the scores
    assert hung_wrong == pytest.approx([0.0, 0.0, 1.0])


def test_side_confidence_matches_cutting_each_edge():
    from modelatlas.lineage.root import bfs, side_confidence

    rng = np.random.default_rng(3)
    for n in (2, 6, 15):
        x = rng.normal(size=(n, 3))
        adj = prim_mst(np.linalg.norm(x[:, None] - x[None], axis=-1))
        score, root = rng.normal(size=n) * 2, int(rng.integers(n))
        parent = _root_at(adj, root)
        w = np.exp(score) / np.exp(score).sum()
        got = side_confidence(adj, parent, score)
        for v, p in enumerate(parent):
            if p >= 0:  # the parent's side: everything the child's subtree does not hold
                below = set(bfs([[y for y in a if {x, y} != {p, v}] for x, a in enumerate(adj)], v)[1].tolist())
                side = sum(w[u] for u in range(n) if u not in below)
                assert got[v] == pytest.approx(max(0.0, min(1.0, 2 * side - 1)))

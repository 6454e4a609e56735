import numpy as np
from sklearn.metrics import adjusted_rand_score

from modelatlas.lineage.clustering import detect_trees, ward_clusters


def make_forest_distances(sizes, within, between=1.4, seed=0):
    """Relative distances of trees of the given sizes: within-tree values drawn from ``within`` (lo, hi)
    spanning orders of magnitude (LoRA edges tiny, full fine-tunes long), unrelated pairs near sqrt(2)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n = len(labels)
    lo, hi = np.log10(within[0]), np.log10(within[1])
    d = 10 ** rng.uniform(lo, hi, size=(n, n))
    d = np.where(labels[:, None] == labels[None, :], d, between * rng.uniform(0.9, 1.05, size=(n, n)))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    return d, labels


def test_k_found_from_the_gap_over_varied_within_distances():
    for seed in range(20):
        sizes = np.random.default_rng(seed).integers(1, 12, size=int(np.random.default_rng(seed).integers(2, 7)))
        d, labels = make_forest_distances(sizes, within=(1e-3, 0.2), seed=seed)
        found, info = detect_trees(d)
        assert info["n_trees"] == len(sizes)
        assert adjusted_rand_score(labels, found) == 1.0


def test_one_tree_with_a_big_internal_jump_stays_one_tree():
    # LoRA edges (1e-4) and full fine-tunes (0.1) in one tree: a 1000x jump, but not to unrelated models.
    d, _ = make_forest_distances([10], within=(1e-4, 0.1))
    labels, info = detect_trees(d)
    assert info["n_trees"] == 1 and set(labels) == {0}


def test_all_unrelated_and_single_model():
    d, _ = make_forest_distances([1, 1, 1, 1], within=(0.01, 0.02))
    assert detect_trees(d)[1]["n_trees"] == 4
    labels, info = detect_trees(np.zeros((1, 1)))
    assert info["n_trees"] == 1 and labels.tolist() == [0]


def test_two_models_decided_by_threshold():
    assert detect_trees(np.array([[0, 0.05], [0.05, 0]]))[1]["n_trees"] == 1
    assert detect_trees(np.array([[0, 1.4], [1.4, 0]]))[1]["n_trees"] == 2


def test_ward_with_given_k():
    d, labels = make_forest_distances([3, 4, 5], within=(0.01, 0.05))
    assert adjusted_rand_score(labels, ward_clusters(d, 3)) == 1.0
    assert ward_clusters(d, 20).tolist() == list(range(12))


def test_long_lora_edges_do_not_split_a_tree():
    # high-learning-rate LoRA children move up to 0.75 (relative); unrelated roots sit at ~1.4
    d, labels = make_forest_distances([13, 13, 13], within=(0.05, 0.75))
    found, info = detect_trees(d)
    assert info["n_trees"] == 3 and adjusted_rand_score(labels, found) == 1.0

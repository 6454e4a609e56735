"""The root of a tree placed by the distance MST: per-layer kurtosis votes plus a centrality prior.

MoTHer (Horwitz, Shul, Hoshen, arXiv 2405.18432) step 3 orients edges by kurtosis; once the edges are
placed (undirected minimum spanning tree, :func:`modelatlas.lineage.orient.orient_mst`), an orientation is
fixed by the choice of the root. The paper's signal, the *summed* kurtosis of all layers, is decided by
differences of ~0.01 near the root on small trained zoos, where one layer with a large swing outvotes the
others. This module scores every candidate root r by

  votes(r) = sum over tree edges p -> c (hung from r) of mean over layers l of tanh(s * (k_l(p) - k_l(c)) / m_l)

(s = +1 "specialize", -1 "generalize"; m_l the median nonzero |k_l difference| over the tree's edges; each
edge's vote is in [-1, 1] and each layer counts once, so one layer's large swing cannot outvote the others,
and a noise-sized change counts little: ``votes="scaled"``, the default. ``votes="sign"``, the earlier rule,
is the sign test sign(s * (k_l(p) - k_l(c)))), plus a prior that the root is central:

  score(r) = votes(r) - prior * b * mean number of hops from r to the other nodes,

where b in [0, 1] is the fraction of inner nodes (degree >= 2) that branch (degree >= 3).

Why the prior: a fine-tuning tree branches (one base model, several fine-tunes of it, each fine-tuned again),
so its root is near the centre of the tree in hops, while a leaf is at the rim. It is a prior on shape, not
a measurement: a chain carries no shape evidence about its root (either end could be it), hence the factor b
(0 on a chain: kurtosis votes alone). Moving the root from a node to its neighbour flips one edge (a change
of 2 x that edge's vote, at most 2) and changes the mean hop count by (size of the side left - size of the
side entered) / (n - 1), at most ~1 (leaving a leaf), ~0.4 between the root and a child of a 3 x 3 x depth-2
tree. With prior = 2 (chosen on development zoos, docs/lineage.md "Orientation") centrality therefore
overrides a root -> child edge only when its layers' vote is weak (|vote| < ~0.4, i.e. about 70/30 or more
split) and never a leaf root unless the leaf's own edge vote is below ~0.9.

Confidence of the root: logistic(best score - runner-up score) in [0.5, 1] (0.5: two roots tie; a margin of
one fully agreeing edge is 0.73); if the runner-up were the root, exactly the edges on the path between the
two would flip.

Time O(n L) per tree of n models and L layers (every root tried by rerooting, hop sums included).
"""

from __future__ import annotations

import math

import numpy as np

PRIOR = 2.0


def edge_votes(adj: list[list[int]], kurtosis: np.ndarray, layer_kurtosis: np.ndarray | None,
               stage: str, votes: str = "scaled") -> dict[tuple[int, int], float]:
    """vote[(u, v)] in [-1, 1]: the mean over layers of each layer's evidence for u -> v.

    ``votes="sign"``: a layer votes sign(s * (k_l(u) - k_l(v))). ``"scaled"``: it votes
    tanh(s * (k_l(u) - k_l(v)) / m_l), m_l the median nonzero |k_l difference| over the tree's edges, so a
    layer's tiny (noise-sized) difference counts little and its typical one ~0.76, and no layer can outvote
    the others by its units (a layer that never changes votes 0). Stored for both directions of every tree
    edge (vote[(v, u)] = -vote[(u, v)]). Without per-layer values (None or no columns) the summed kurtosis is
    the single layer. Time O(n L).
    """
    lk = per_layer(kurtosis, layer_kurtosis)  # (n, L)
    s = 1.0 if stage == "specialize" else -1.0  # specialize: a parent has more outliers than its child
    pairs = [(u, v) for u, nbrs in enumerate(adj) for v in nbrs if u < v]
    if not pairs:
        return {}
    u, v = np.array(pairs).T  # (E,), (E,)
    d = s * (lk[u] - lk[v])  # (E, L)
    val = np.tanh(d / layer_scales(d)).mean(1) if votes == "scaled" else np.sign(d).mean(1)  # (E,)
    out: dict[tuple[int, int], float] = {}
    for (a, b), x in zip(pairs, val.tolist()):
        out[(a, b)], out[(b, a)] = x, -x
    return out


def per_layer(kurtosis: np.ndarray, layer_kurtosis: np.ndarray | None) -> np.ndarray:
    """(n, L) per-layer kurtosis; without per-layer values (None or no columns) the summed kurtosis is the
    single layer. Time O(n L)."""
    if layer_kurtosis is None or np.ndim(layer_kurtosis) != 2 or np.shape(layer_kurtosis)[1] == 0:
        return np.asarray(kurtosis, dtype=np.float64)[:, None]
    return np.asarray(layer_kurtosis, dtype=np.float64)


def layer_scales(d: np.ndarray) -> np.ndarray:
    """(L,) median of the nonzero |d| of each column of d (E, L); inf for a column of zeros (its votes are 0)."""
    a = np.abs(d)
    return np.array([np.median(c[c > 0]) if (c > 0).any() else np.inf for c in a.T])


def bfs(adj: list[list[int]], root: int) -> tuple[np.ndarray, np.ndarray]:
    """(parent, visiting order) of the tree ``adj`` hung from ``root``, breadth first (parents before their
    children). Time O(n)."""
    parent = np.full(len(adj), -1)
    order, seen = [root], {root}
    for x in order:
        for y in adj[x]:
            if y not in seen:
                seen.add(y)
                parent[y] = x
                order.append(y)
    return parent, np.array(order)


def hop_sums(adj: list[list[int]]) -> np.ndarray:
    """(n,) sum of tree hop distances from each node to all others, for a tree ``adj`` (connected).

    Rerooting: the sum from the BFS root is the sum of depths, and moving from u to its child v brings the
    size(v) nodes below v one hop closer and the other n - size(v) one hop further, so
    S(v) = S(u) + n - 2 size(v). Time O(n) (one BFS per node was O(n^2) in Python: 3.7 s of a
    2,000-checkpoint chain).
    """
    n = len(adj)
    if n == 0:
        return np.zeros(0)
    parent, order = bfs(adj, 0)
    if len(order) != n:
        raise ValueError(f"hop_sums: the graph is not one tree ({len(order)} of {n} nodes reachable from node 0)")
    size, depth = np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for v in order[1:]:
        depth[v] = depth[parent[v]] + 1
    for v in order[:0:-1]:  # children before parents
        size[parent[v]] += size[v]
    out = np.zeros(n)
    out[order[0]] = depth.sum()
    for v in order[1:]:
        out[v] = out[parent[v]] + n - 2 * size[v]
    return out


def root_scores(adj: list[list[int]], kurtosis: np.ndarray, layer_kurtosis: np.ndarray | None, stage: str,
                prior: float = PRIOR, votes: str = "scaled") -> np.ndarray:
    """(n,) score of each node as the root: kurtosis votes of the edges hung from it - prior * mean hops.

    votes(r) is computed for every r at once by rerooting: moving the root across edge (u, v) flips that
    edge only, so votes(v) = votes(u) - vote(u -> v) + vote(v -> u). Time O(n L).
    """
    n = len(adj)
    if n == 0:
        return np.zeros(0)
    vote = edge_votes(adj, kurtosis, layer_kurtosis, stage, votes)
    votes = np.zeros(n)
    parent, order = bfs(adj, 0)
    votes[0] = sum(vote[(parent[c], c)] for c in order[1:])
    for v in order[1:]:
        u = parent[v]
        votes[v] = votes[u] - vote[(u, v)] + vote[(v, u)]
    mean_hops = hop_sums(adj) / max(n - 1, 1)
    return votes - prior * branching(adj) * mean_hops


def stage_lean(adj: list[list[int]], kurtosis: np.ndarray, layer_kurtosis: np.ndarray | None,
               votes: str = "scaled") -> float:
    """The tree's lean towards "specialize" read from its root scores: best score hung as "specialize" - best
    as "generalize" (> 0: "specialize"; 0 for a single model). Each edge's vote is a mean over layers, each
    layer scaled by its typical change, so a noise-sized change counts little (:func:`edge_votes`), where the
    violation count of :func:`~modelatlas.lineage.orient.tree_evidence` counts each edge whole by the sign
    of its summed kurtosis. Time O(n L)."""
    if len(adj) < 2:
        return 0.0
    return float(root_scores(adj, kurtosis, layer_kurtosis, "specialize", votes=votes).max()
                 - root_scores(adj, kurtosis, layer_kurtosis, "generalize", votes=votes).max())


def side_confidence(adj: list[list[int]], parent: list[int], score: np.ndarray) -> np.ndarray:
    """(n,): for each edge parent[v] -> v, how sure the root scores are that the root lies on the parent's
    side: 2 P - 1 clipped to [0, 1], P = the share of softmax(score) on the parent's side once the edge is cut
    (its direction is right exactly when the root is there). 0: a coin flip or against; the root gets 1.
    Consistent with the root confidence (logistic of the score margin: two candidates give P = it).
    Time O(n)."""
    n = len(adj)
    out = np.ones(n)
    if n < 2:
        return out
    w = np.exp(np.asarray(score, dtype=np.float64) - np.max(score))  # (n,) unnormalised root probabilities
    root = next(v for v, p in enumerate(parent) if p < 0)
    _, order = bfs(adj, root)
    below = w.copy()
    for v in order[::-1][:-1]:  # children before their parents: each subtree's root mass
        below[parent[v]] += below[v]
    for v in order[1:]:
        out[v] = float(np.clip(2 * (1 - below[v] / below[root]) - 1, 0.0, 1.0))
    return out


def branching(adj: list[list[int]]) -> float:
    """Fraction of the inner nodes (degree >= 2) that branch (degree >= 3); 0 for a chain. Time O(n)."""
    deg = np.array([len(a) for a in adj])
    inner = int((deg >= 2).sum())
    return float((deg >= 3).sum()) / inner if inner else 0.0


def choose_root(adj: list[list[int]], kurtosis: np.ndarray, layer_kurtosis: np.ndarray | None, stage: str,
                prior: float = PRIOR, votes: str = "scaled") -> tuple[int, float, int]:
    """(root, confidence in [0.5, 1], runner-up root) of one tree. Ties go to the smaller summed kurtosis
    violation, then the lower index. Time O(n L + n log n)."""
    if len(adj) < 2:
        return 0, 1.0, 0
    return pick_root(root_scores(adj, kurtosis, layer_kurtosis, stage, prior, votes), kurtosis, stage)


def pick_root(score: np.ndarray, kurtosis: np.ndarray, stage: str) -> tuple[int, float, int]:
    """(root, confidence, runner-up) from the root scores of a tree of at least 2 nodes
    (:func:`choose_root`'s ties and confidence). Time O(n log n)."""
    n = len(score)
    k = np.asarray(kurtosis, dtype=np.float64)
    s = 1.0 if stage == "specialize" else -1.0
    tie = -s * k  # among tied roots, prefer the one the stage expects at the top (largest s * k)
    order = sorted(range(n), key=lambda r: (-round(float(score[r]), 9), float(tie[r]), r))
    best, second = order[0], order[1]
    margin = float(score[best] - score[second])
    return best, 1.0 / (1.0 + math.exp(-margin)), second

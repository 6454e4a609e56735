"""Edge direction and placement inside one tree: kurtosis penalty, arborescence, stage, confidence.

MoTHer (Horwitz, Shul, Hoshen, "On the Origin of Llamas: Model Tree Heritage Recovery", arXiv 2405.18432):
  step 3 (direction): weight outliers shrink when fine-tuning on narrow data ("specialize": an edge u -> v
    expects kurtosis k(u) > k(v)) and grow during pretraining-like training ("generalize": k(u) < k(v));
  step 4 (edge cost): M_uv = D_uv + lambda * mean(D) * 1[direction violated], M_uu = +inf;
  step 5 (tree): minimum spanning arborescence of M; the root is the node left without a parent.

By default (``placement="mst"``) the edges are placed by distance alone (undirected minimum spanning tree)
and kurtosis only orients them (the root: per-layer kurtosis votes + a centrality prior, :mod:`.root`;
``orient="kurtosis"``: the summed kurtosis, :func:`orient_mst`): on trained zoos the joint arborescence lets a noisy kurtosis difference
move a child to its grandparent or sibling (see docs/lineage.md for the measured difference).

Beyond the paper:
  * **stage from the evidence** (:func:`tree_evidence`, :func:`pooled_stage`): both orientations are solved; the right one should
    need fewer violations and less distance. The evidence is the cost difference in units of one
    violation penalty (lambda * mean(D)), summed over trees (:mod:`.stage` gives each tree its own stage
    from its evidence and the others'). It is exactly zero on a chain (a chain read
    backwards is as good a tree), where the stage cannot be told from weights and "specialize" (the common
    case) is reported with confidence 0.5.
  * **edge confidence** (:func:`edge_scores`): the relative margin between the chosen edge's cost and the
    best alternative -- another parent for the child, or the same edge reversed.

Time O(n^3) per tree of n models (Edmonds), memory O(n^2).
"""

from __future__ import annotations

import math

import numpy as np

from modelatlas.lineage.edmonds import arborescence_cost, minimum_spanning_arborescence
from modelatlas.lineage.root import PRIOR, bfs, pick_root, root_scores, side_confidence


def violations(kurtosis: np.ndarray, stage: str) -> np.ndarray:
    """V[u, v] = True when edge u -> v goes against the stage's kurtosis direction. Time O(n^2)."""
    k = np.asarray(kurtosis, dtype=np.float64)
    if stage == "specialize":
        return k[:, None] < k[None, :]  # a fine-tuned child should have fewer outliers than its parent
    return k[:, None] > k[None, :]


def edge_costs(dist: np.ndarray, kurtosis: np.ndarray, stage: str, lam: float) -> np.ndarray:
    """MoTHer step 4: M = D + lam * mean(D) * 1[violated], diagonal +inf. Time O(n^2)."""
    n = dist.shape[0]
    off = dist[~np.eye(n, dtype=bool)]
    unit = lam * (off.mean() if off.size else 0.0)
    m = dist + unit * violations(kurtosis, stage)
    np.fill_diagonal(m, np.inf)
    return m


def penalty_unit(dist: np.ndarray, lam: float) -> float:
    """lambda * mean off-diagonal distance: the cost of one direction violation."""
    n = dist.shape[0]
    off = dist[~np.eye(n, dtype=bool)]
    return float(lam * off.mean()) if off.size else 0.0


def solve_tree(dist: np.ndarray, kurtosis: np.ndarray, stage: str, lam: float,
               placement: str = "mst") -> tuple[list[int], float, int]:
    """(parent, total cost under M, number of violated edges) of one tree for ``stage``.

    ``placement="joint"`` (MoTHer step 5): the minimum spanning arborescence of M, where the direction
    penalty may also move edges. ``"mst"``: the edges are the undirected minimum spanning tree of D (where
    a model sits is a question of distance only) and kurtosis only picks the root, the one whose
    orientation violates the fewest edges (ties: the smallest summed kurtosis violation). Time O(n^3)
    (joint) or O(n^2) (mst).
    """
    m = edge_costs(dist, kurtosis, stage, lam)
    parent = minimum_spanning_arborescence(m) if placement == "joint" else orient_mst(dist, kurtosis, stage)
    v = violations(kurtosis, stage)
    n_bad = sum(int(v[p, c]) for c, p in enumerate(parent) if p >= 0)
    return parent, arborescence_cost(m, parent), n_bad


def orient_mst(dist: np.ndarray, kurtosis: np.ndarray, stage: str) -> list[int]:
    """Parents of the undirected MST of ``dist`` rooted where the kurtosis direction is best kept: the root
    whose orientation violates the fewest edges (ties: the smallest summed violation, then the lowest index).

    Every root is scored at once by rerooting: moving the root across edge (u, v) flips that edge only, so
    count(v) = count(u) - bad(u -> v) + bad(v -> u). Near-ties are re-summed exactly, as a direct sum would
    be. Time O(n^2) for the MST, O(n) for the roots (it was O(n^2) Python steps, 1 s at n = 1000).
    """
    n = dist.shape[0]
    adj = prim_mst(dist)
    if n < 2:
        return [-1] * n
    k = np.asarray(kurtosis, dtype=np.float64)
    sign = 1.0 if stage == "specialize" else -1.0  # specialize: k(parent) > k(child)
    parent0, order = bfs(adj, 0)
    u, v = parent0[order[1:]], order[1:]  # every tree edge, oriented from node 0
    drop = sign * (k[u] - k[v])  # (n - 1,) > 0: the edge u -> v keeps the direction
    count, excess = np.zeros(n), np.zeros(n)
    count[0], excess[0] = (drop < 0).sum(), np.where(drop < 0, -drop, 0.0).sum()
    flip_count = (drop > 0).astype(float) - (drop < 0)  # change when the edge is reversed
    flip_excess = np.where(drop > 0, drop, 0.0) - np.where(drop < 0, -drop, 0.0)
    for i, c in enumerate(v):  # BFS order: a node's parent is scored before it
        count[c] = count[u[i]] + flip_count[i]
        excess[c] = excess[u[i]] + flip_excess[i]
    cands = np.flatnonzero(count == count.min())
    near = cands[excess[cands] <= excess[cands].min() + 1e-9 * (1.0 + np.abs(excess[cands]).max())]
    root = min(near[:32], key=lambda r: (_excess(adj, int(r), k, sign), int(r)))
    return _root_at(adj, int(root))


def _excess(adj: list[list[int]], root: int, k: np.ndarray, sign: float) -> float:
    """Summed kurtosis violation of the orientation from ``root``, summed in child order. Time O(n)."""
    parent = bfs(adj, root)[0]
    child = np.flatnonzero(parent >= 0)
    drop = sign * (k[parent[child]] - k[child])
    return float(-drop[drop < 0].sum())


def orient_votes(dist: np.ndarray, kurtosis: np.ndarray, layer_kurtosis: np.ndarray | None, stage: str,
                 prior: float = PRIOR, votes: str = "scaled") -> tuple[list[int], float, int]:
    """(parents, root confidence in [0.5, 1], runner-up root) of the undirected MST of ``dist`` hung from the
    root chosen by per-layer kurtosis votes and a centrality prior (:func:`modelatlas.lineage.root.choose_root`).
    Time O(n^2 + n L).
    """
    return orient_votes_sure(dist, kurtosis, layer_kurtosis, stage, prior, votes)[:3]


def orient_votes_sure(dist: np.ndarray, kurtosis: np.ndarray, layer_kurtosis: np.ndarray | None, stage: str,
                      prior: float = PRIOR, votes: str = "scaled") -> tuple[list[int], float, int, np.ndarray]:
    """:func:`orient_votes` and, from the same root scores, the (n,) direction confidence of each edge: how
    much of their weight lies on the parent's side (:func:`modelatlas.lineage.root.side_confidence`).
    Time O(n^2 + n L)."""
    adj = prim_mst(dist)
    if len(adj) < 2:
        return _root_at(adj, 0), 1.0, 0, np.ones(len(adj))
    score = root_scores(adj, kurtosis, layer_kurtosis, stage, prior, votes)
    root, conf, second = pick_root(score, kurtosis, stage)
    parent = _root_at(adj, root)
    return parent, conf, second, side_confidence(adj, parent, score)


def prim_mst(dist: np.ndarray) -> list[list[int]]:
    """Adjacency lists of a minimum spanning tree of the complete graph ``dist`` (Prim). Time O(n^2)."""
    n = dist.shape[0]
    adj: list[list[int]] = [[] for _ in range(n)]
    if n == 0:
        return adj
    inside = np.zeros(n, dtype=bool)
    inside[0] = True
    best = np.asarray(dist[0], dtype=np.float64).copy()  # cheapest link of each outside node to the tree
    link = np.zeros(n, dtype=int)
    for _ in range(n - 1):
        v = int(np.argmin(np.where(inside, np.inf, best)))
        adj[v].append(int(link[v]))
        adj[int(link[v])].append(v)
        inside[v] = True
        closer = dist[v] < best
        best = np.where(closer, dist[v], best)
        link = np.where(closer, v, link)
    return adj


def _root_at(adj: list[list[int]], root: int) -> list[int]:
    """Parent of every node when the tree ``adj`` hangs from ``root`` (-1 for the root). Time O(n)."""
    return bfs(adj, root)[0].tolist()


def hung_from(parent: list[int], root: int) -> list[int]:
    """The tree ``parent`` (-1 at its root) hung from ``root`` instead: the same undirected tree, the edges on
    the path from ``root`` up to the old root turned round, the others kept. Time O(n)."""
    out, v, below = list(parent), root, -1
    while v >= 0:
        up = parent[v]
        out[v] = below
        below, v = v, up
    return out


def tree_evidence(trees: list[tuple[np.ndarray, np.ndarray]], lam: float,
                  placement: str = "mst") -> tuple[np.ndarray, dict[str, int]]:
    """(T,) each tree's own stage evidence, (cost_generalize - cost_specialize) / (lambda * mean(D)) of its
    (D, kurtosis) solved both ways (> 0: "specialize"; 0 for a chain, a single model or lambda = 0), and the
    violated edges summed over trees under each stage. Time O(sum n^3) (joint) or O(sum n^2) (mst)."""
    evidence, viol = np.zeros(len(trees)), {"specialize": 0, "generalize": 0}
    for t, (dist, kurt) in enumerate(trees):
        if dist.shape[0] < 2:
            continue
        unit = penalty_unit(dist, lam)
        cost = {}
        for stage in viol:
            _, cost[stage], bad = solve_tree(dist, kurt, stage, lam, placement)
            viol[stage] += bad
        if unit > 0:
            evidence[t] = (cost["generalize"] - cost["specialize"]) / unit
    return evidence, viol


def pooled_stage(evidence: float) -> tuple[str, float]:
    """(stage, confidence) of summed ``evidence`` in violation penalties: > 0 "specialize", < 0
    "generalize", none (|evidence| < 1e-9: a chain read backwards is as good a tree) "specialize", the common
    case; confidence logistic(|evidence|), 0.5 without evidence. Time O(1)."""
    stage = "generalize" if evidence < -1e-9 else "specialize"
    return stage, 1.0 / (1.0 + math.exp(-abs(evidence)))


def edge_scores(cost: np.ndarray, parent: list[int]) -> list[float]:
    """Confidence of each edge parent[v] -> v in [0, 1]; roots get 1.0.

    score = 1 - M[p, v] / min(best other parent of v, M[v, p]) clipped to [0, 1]: 0 when an alternative is
    as cheap (a coin flip), near 1 when every alternative costs far more. Time O(n^2).
    """
    n = cost.shape[0]
    out = []
    for v, p in enumerate(parent):
        if p < 0:
            out.append(1.0)
            continue
        col = cost[:, v].copy()
        col[[p, v]] = np.inf
        alt = min(float(col.min()) if n > 2 else math.inf, float(cost[v, p]))
        chosen = float(cost[p, v])
        if not math.isfinite(alt):
            out.append(1.0)
        elif alt <= 0:
            out.append(0.0)
        else:
            out.append(float(np.clip(1.0 - chosen / alt, 0.0, 1.0)))
    return out


def mst_edge_scores(dist: np.ndarray, kurtosis: np.ndarray, stage: str, parent: list[int],
                    direction: np.ndarray | None = None) -> list[float]:
    """Confidence in [0, 1] of each edge parent[v] -> v of a tree placed by the MST; roots get 1.0.

    placement = 1 - D(edge) / D(best replacement edge): cutting the edge splits the tree in two, and the
    replacement is the cheapest other pair joining the two parts (the MST sensitivity margin; 0 when another
    edge is as good). direction = 1 - exp(-|dk| / median |dk|) when the kurtosis change keeps the stage's
    direction, 0 when it goes against it; ``direction`` (n,) given instead when the orientation came from a
    root choice (:func:`modelatlas.lineage.root.side_confidence`). score = min(placement, direction). Time O(n^2 log n)
    (:func:`replacement_costs`), whatever the tree's depth.
    """
    if direction is None:
        direction = kurtosis_directions(kurtosis, stage, parent)
    alts = replacement_costs(dist, parent)
    out = []
    for v, p in enumerate(parent):
        if p < 0:
            out.append(1.0)
            continue
        alt = float(alts[v])
        place = 1.0 if not np.isfinite(alt) else (float(np.clip(1 - dist[p, v] / alt, 0, 1)) if alt > 0 else 0.0)
        out.append(min(place, float(direction[v])))
    return out


def kurtosis_directions(kurtosis: np.ndarray, stage: str, parent: list[int]) -> np.ndarray:
    """(n,) for each edge parent[v] -> v: 1 - exp(-dk / median |dk|) when the summed kurtosis change dk keeps
    the stage's direction, else 0 (roots: 1). Time O(n)."""
    sign = 1.0 if stage == "specialize" else -1.0
    dks = [sign * (kurtosis[p] - kurtosis[v]) for v, p in enumerate(parent) if p >= 0]
    scale = float(np.median(np.abs(dks))) if dks else 1.0
    out = np.ones(len(parent))
    for v, p in enumerate(parent):
        if p >= 0:
            dk = sign * (kurtosis[p] - kurtosis[v])
            out[v] = float(1 - np.exp(-dk / scale)) if dk > 0 and scale > 0 else 0.0
    return out


def replacement_costs(dist: np.ndarray, parent: list[int], block: int = 1 << 16) -> np.ndarray:
    """(n,): for each edge parent[v] -> v, the smallest dist[x, y] over the other pairs that join v's subtree
    to the rest (inf for a root, or when no other pair exists).

    MST sensitivity, Kruskal-style: the non-tree pairs in increasing distance, each assigned to the edges of
    its tree path that no smaller pair covered; a union-find that points past assigned edges skips them, so
    each edge is assigned once. The pairs are sorted O(n^2 log n) and scanned in blocks until every edge has
    its cost, usually after a few n pairs. (Masking each subtree instead cost O(n^2 depth) in Python: a chain
    of 1,000 checkpoints took 11.6 s to recover instead of 2.8 s.)
    """
    n = len(parent)
    depth, alt = _depths(parent), np.full(n, np.inf)
    up = list(range(n))  # up[v] == v while the edge above v has no cost yet; else a step towards the root
    left = sum(p >= 0 for p in parent)
    iu, ju = np.triu_indices(n, 1)
    tree = np.array([min(p, v) * n + max(p, v) for v, p in enumerate(parent) if p >= 0], dtype=np.int64)
    keep = ~np.isin(iu.astype(np.int64) * n + ju, tree)  # the tree's own edges are not replacements
    iu, ju = iu[keep], ju[keep]
    order = np.argsort(dist[iu, ju], kind="stable")
    for start in range(0, len(order), block):
        if left == 0:
            break
        chunk = order[start:start + block]
        for x, y, d in zip(iu[chunk].tolist(), ju[chunk].tolist(), dist[iu[chunk], ju[chunk]].tolist()):
            left -= _cover(x, y, d, parent, depth, up, alt)
            if left == 0:
                break
    return alt


def _cover(x: int, y: int, d: float, parent: list[int], depth: list[int], up: list[int], alt: np.ndarray) -> int:
    """Give cost d to the uncovered edges on the tree path x .. y (through both roots if x and y lie in
    different trees); returns how many."""
    x, y, done = _find(up, x), _find(up, y), 0
    while x != y:
        if depth[x] < depth[y]:
            x, y = y, x
        if parent[x] < 0:  # both are roots (depth 0) of different trees
            break
        alt[x], up[x], done = d, parent[x], done + 1
        x = _find(up, x)
    return done


def _find(up: list[int], v: int) -> int:
    """The nearest ancestor-or-self of v whose edge has no cost yet (or a root), with path compression."""
    root = v
    while up[root] != root:
        root = up[root]
    while up[v] != root:
        up[v], v = root, up[v]
    return root


def _depths(parent: list[int]) -> list[int]:
    """Depth of every node below its root (0 for a root). Iterative, O(n) with memoisation."""
    depth = [-1] * len(parent)
    for v in range(len(parent)):
        path, u = [], v
        while u >= 0 and depth[u] < 0:
            path.append(u)
            u = parent[u]
        base = -1 if u < 0 else depth[u]
        for w in reversed(path):
            base += 1
            depth[w] = base
    return depth

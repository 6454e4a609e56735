"""Minimum spanning arborescence (Chu-Liu/Edmonds), as a pure function on a dense cost matrix.

Y. J. Chu and T. H. Liu, "On the shortest arborescence of a directed graph", Scientia Sinica 14 (1965);
J. Edmonds, "Optimum branchings", J. Res. Nat. Bur. Standards 71B (1967). MoTHer (Horwitz et al., 2024)
uses it as its final step (paper step 5: "Tree"): the lineage forest is the minimum spanning arborescence
of the edge-cost matrix M, and the root is whichever node is left without a parent.

Steps, as labelled in the comments below (Edmonds 1967, Sec. 2):
  1. every non-root node picks its cheapest incoming edge;
  2. if these edges form no cycle they are the answer;
  3. otherwise contract one cycle C into a super-node; an edge u -> v entering C costs
     ``M[u, v] - M[pick(v), v]`` (the price of breaking the cycle at v), an edge leaving C keeps its cost;
  4. solve the contracted graph recursively;
  5. expand: the cycle node entered from outside takes that edge, the others keep their cycle edge.

Time O(n^3) for n nodes (at most n contractions, each O(n^2) on the dense matrix); memory O(n^2) (each
contraction keeps O(n |C|) for the expansion).
"""

from __future__ import annotations

import numpy as np


def minimum_spanning_arborescence(cost: np.ndarray) -> list[int]:
    """Minimum-cost spanning arborescence of the complete digraph ``cost[u, v]`` = cost of edge u -> v.

    Any node may be the root; ``+inf`` marks a forbidden edge (the diagonal is ignored). Returns
    ``parent`` with ``parent[v] = -1`` for roots. A single root is found whenever one exists (a virtual
    root reaches every node through an edge dearer than any whole tree); nodes that no finite edge reaches
    become extra roots. Time O(n^3), memory O(n^2).
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"cost must be square; got shape {cost.shape}")
    if n == 0:
        return []
    finite = np.isfinite(cost) & ~np.eye(n, dtype=bool)
    big = 1.0 + n * (np.abs(cost[finite]).max() if finite.any() else 1.0) * 2.0
    # Virtual root 0 with an edge of cost `big` to every node: a second root edge always costs more
    # than any set of real edges, so the optimum uses one root edge whenever a spanning tree exists.
    full = np.full((n + 1, n + 1), np.inf)
    full[1:, 1:] = np.where(finite, cost, np.inf)
    full[0, 1:] = big
    parent = _edmonds(full, root=0)
    return [int(p) - 1 for p in parent[1:]]


def _edmonds(cost: np.ndarray, root: int) -> np.ndarray:
    """Edmonds on a dense matrix with a fixed root; returns ``parent`` (``parent[root] = -1``).

    The recursion of step 4 is unrolled into a loop over a stack of contractions: mutual nearest
    neighbours make 2-cycles common, so a tree of thousands of models can need thousands of contractions,
    deeper than Python's recursion limit."""
    stack = []
    while True:
        c, pick = _cheapest_incoming(cost, root)  # Step 1
        cycle = _find_cycle(pick, root)
        if cycle is None:  # Step 2: no cycle -> done at this level
            break
        level = _contract(c, pick, cycle, root)  # Step 3
        stack.append(level)
        cost, root = level["small"], level["root"]  # Step 4: solve the contracted graph next
    parent = pick
    while stack:  # Step 5, innermost contraction first
        parent = _expand(stack.pop(), parent)
    return parent


def _cheapest_incoming(cost: np.ndarray, root: int) -> tuple[np.ndarray, np.ndarray]:
    c = cost.copy()
    np.fill_diagonal(c, np.inf)
    c[:, root] = np.inf
    pick = np.argmin(c, axis=0)
    pick[root] = -1
    return c, pick


def _contract(c: np.ndarray, pick: np.ndarray, cycle: list[int], root: int) -> dict:
    """Contract ``cycle`` into super-node s (the last index of the contracted graph). Time O(n |C|)."""
    n = c.shape[0]
    in_cycle = np.zeros(n, dtype=bool)
    in_cycle[cycle] = True
    rest = np.flatnonzero(~in_cycle)  # old indices of the nodes kept as they are
    s = len(rest)
    index = np.full(n, s)
    index[rest] = np.arange(s)
    cyc = np.array(cycle)
    enter = c[:, cyc] - c[pick[cyc], cyc][None, :]  # (n, |C|): cost of entering C at each cycle node
    small = np.full((s + 1, s + 1), np.inf)
    small[:s, :s] = c[np.ix_(rest, rest)]
    small[:s, s] = enter[rest].min(axis=1)
    small[s, :s] = c[np.ix_(cyc, rest)].min(axis=0)
    # keep only what step 5 needs (O(n |C|), not the O(n^2) matrix: a stack of thousands of levels must fit)
    return {"n": n, "from_cyc": c[cyc], "pick_cyc": pick[cyc], "rest": rest, "cyc": cyc, "enter": enter,
            "small": small, "root": int(index[root])}


def _expand(level: dict, sub: np.ndarray) -> np.ndarray:
    """Parents in the graph before ``level``'s contraction, from the contracted graph's parents ``sub``."""
    rest, cyc, enter, s = level["rest"], level["cyc"], level["enter"], len(level["rest"])
    parent = np.full(level["n"], -1)
    for k, v in enumerate(rest):
        p = sub[k]
        parent[v] = -1 if p < 0 else (rest[p] if p < s else cyc[np.argmin(level["from_cyc"][:, v])])
    u = rest[sub[s]]  # the outside node whose edge enters the cycle
    entry = cyc[np.argmin(enter[u])]
    parent[cyc] = level["pick_cyc"]
    parent[entry] = u
    return parent


def _find_cycle(pick: np.ndarray, root: int) -> list[int] | None:
    """A cycle of the functional graph ``v -> pick[v]``, or None. Time O(n)."""
    n = len(pick)
    state = np.zeros(n, dtype=np.int8)  # 0 unseen, 1 on current walk, 2 finished
    for start in range(n):
        path, v = [], start
        while v != -1 and v != root and state[v] == 0:
            state[v] = 1
            path.append(v)
            v = int(pick[v])
        if v != -1 and v != root and state[v] == 1:
            return path[path.index(v):]
        state[path] = 2
    return None


def arborescence_cost(cost: np.ndarray, parent: list[int]) -> float:
    """Total cost of the edges ``parent[v] -> v`` (roots cost nothing)."""
    return float(sum(cost[p, v] for v, p in enumerate(parent) if p >= 0))

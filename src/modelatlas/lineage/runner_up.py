"""Each placed model's runner-up parent: the model it would hang from if not from the one it was given.

Where placement by distance errs, it mostly hangs a model one level too deep or beside its place, below a
sibling or an uncle trained on a like task (docs/lineage.md, "Stars"), and there the two candidate parents lie
within a few percent of each other. The runner-up -- the nearest model outside the child's own subtree, other
than its parent -- was the true parent of 51 of the 60 misplaced (not reversed) edges of the 17 development,
22 held-out and 4 star zoos of the benchmarks; within :data:`CLOSE` (10 % farther) it flagged 44 of them,
naming the true parent for 37 (docs/benchmarks.md, "Session 35: runner-up parents"). So a close runner-up is shown beside its edge: the user learns where the model
may belong instead, not only that its edge is weak. Pure function on a distance matrix and a parent array.
"""

from __future__ import annotations

import numpy as np

CLOSE = 1.10  # a runner-up at most 10 % farther than the parent is a close call (chosen on the development zoos)
_BLOCK = 1024  # rows of the (B, n) masks per step: memory O(B n) whatever the tree's size


def runner_up_parents(dist: np.ndarray, parent: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(runner-up (n,), ratio (n,)) for the tree ``parent`` (-1 at a root) over the distances ``dist`` (n, n).

    For each model v with a parent p: the model u nearest to v (``dist[v, u]``) that is neither p nor in v's own
    subtree (hanging v from its own descendant would make a cycle), and ``dist[v, u] / dist[v, p]`` (>= 1 when
    the tree is a minimum spanning tree; inf when the parent is at distance 0). -1 and inf for a root or when
    no other model is eligible. Time O(n^2), memory O(n) plus one block of rows.
    """
    n = len(parent)
    tin, tout = _euler_tour(parent)
    alt, ratio = np.full(n, -1), np.full(n, np.inf)
    rows = np.array([v for v in range(n) if parent[v] >= 0], dtype=np.int64)
    for a in range(0, len(rows), _BLOCK):
        v = rows[a:a + _BLOCK]  # (B,)
        inside = (tin[None, :] >= tin[v, None]) & (tin[None, :] < tout[v, None])  # (B, n): u in subtree(v)
        d = np.where(inside, np.inf, dist[v].astype(np.float64))  # (B, n)
        p = np.asarray(parent)[v]
        d[np.arange(len(v)), p] = np.inf
        best = d.argmin(1)  # (B,)
        near = d[np.arange(len(v)), best]
        ok = np.isfinite(near)
        alt[v[ok]] = best[ok]
        dp = dist[v, p].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio[v[ok]] = np.where(dp[ok] > 0, near[ok] / dp[ok], np.inf)
    return alt, ratio


def _euler_tour(parent: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(entry (n,), exit (n,)) times of a depth-first walk of the forest ``parent``: u lies in v's subtree
    exactly when entry[v] <= entry[u] < exit[v]. Iterative, O(n)."""
    n = len(parent)
    kids: list[list[int]] = [[] for _ in range(n)]
    for v, p in enumerate(parent):
        if p >= 0:
            kids[p].append(v)
    tin, tout, clock = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), 0
    for root in (v for v in range(n) if parent[v] < 0):
        stack = [(root, False)]
        while stack:
            v, done = stack.pop()
            if done:
                tout[v] = clock
                continue
            tin[v], clock = clock, clock + 1
            stack.append((v, True))
            stack.extend((c, False) for c in reversed(kids[v]))
    return tin, tout

"""Merged models: a model that is a weighted sum of other models given (a linear merge or model soup,
``M = a A + (1 - a) B``; task arithmetic, ``M = P + x (A - P) + y (B - P)``), found from the pairwise squared
distances of the one pass over the weights, and placed beside its parents instead of inside the tree.

A fine-tune's own update is nearly orthogonal to every other model's, so no line or plane through other models
passes near it. A merge lies exactly on the segment between its parents (or in the plane of its base and the
two fine-tunes whose updates it adds): its residual off that line or plane is zero but for float rounding. The
distances come from linear maps of the weights (the Gram matrix, or its seeded sign-bucket sketch on large
layers), which keep a weighted sum a weighted sum, so the residual stays zero however the distances were
sketched. By the law of cosines the projection of M on the line (A, B) or the plane (P, A, B) needs only the
squared distances between them: O(1) per candidate, with no second read.

Unplaced, a merge lies between its parents and draws them below itself: a 50/50 merge of two siblings became
the parent of both in a development zoo, and a task-arithmetic merge the parent of one (docs/benchmarks.md,
"Session 35: merged models"). Checkpoints of one training run are the nearest non-merges: an intermediate
checkpoint lay 0.13-0.72 of its nearest-neighbour distance off the line through two others (Adam and SGD on
digits), against :data:`MERGE_TOL` = 0.05. Stored at bfloat16 or float16, a merge is rounded, and fine-tunes of
a large model differ by a few units in the last place, so the rounding can be as large as what tells a merge:
a rounded model's residual is judged with :data:`ROUNDED_SLACK` times its expected rounding energy
(:data:`ROUNDING_SHARE` of its squared norm) taken out, and then its values must be its parents' weighted sum
rounded, value by value on sampled rows (:func:`on_merge_grid`); so must a per-layer segment up to
:data:`CURVE_TOL` off (SLERP of far-apart tensors, a curve: as a A + b B per layer). A 50/50 and a SLERP merge
of two bfloat16 1B fine-tunes are found so (the test on squared distances alone cannot tell them: their
rounding is 18 % of the squared distance between them); a bfloat16 base with fine-tunes 0.2 % away is no merge
of them. Time O(N k^2 F) for N models, k = :data:`NEIGHBOURS` and F = :data:`FAR`, then O(F k^2 F) a merge
found; memory O(k^2 F); a value check reads sampled rows of the candidate and its parents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from modelatlas.lineage.merge_values import SampledRows, merge_fit, verify_grid

# entries of the per-layer squared distances kept (128 MB: 200 models x 800 layers) for merges with a weight per
# layer; none over it, nor when a model is quantized (a stand-in's rounding is in its distances)
LAYER_SQ_CAP = 1 << 25
MERGE_TOL = 0.05  # residual off the line / plane, over the distance to the nearest other model
NEIGHBOURS = 8  # a merge's nearer parent (or its plane's base and one parent) is among its 8 nearest models
FAR = 64  # ... and its other parent among its 64 nearest (a merge of cousins lies half-way between them)
MIN_WEIGHT = 0.05  # every parent of a merge counts (a coefficient of 0.01 is noise, not a merge)
MAX_WEIGHT = 1.5  # a task vector added at most about whole (1.5 x: extrapolation, no merge recipe's)
# a plane's two directions at least ~6 degrees apart (sin^2 >= 0.01): two merges of the same parents, 1 % apart,
# spanned an ill-conditioned plane that took a parent for a merge of them (weights -1, 1, 1, residual 0.04)
MIN_SIN2 = 0.01
# expected squared rounding error over the squared value of a float rounded to nearest: (ulp^2 / 12) / E[w^2]
# = 2^(-2 p) / 12 / E[w^2 / 2^(2 e)], p the fraction bits (7 bfloat16, 10 float16), w in [2^e, 2^(e + 1)); with
# a density ~ 1 / w^2 within each binade (bell-shaped weights: more of them at its low end), E = 2: 2^(-2 p) / 24
# (measured on a merge of two CNN fine-tunes rounded to bfloat16: 2.63e-6 of its squared norm, this 2.54e-6;
# evenly spread values, E = 7 / 3, would give 2.18e-6)
ROUNDING_SHARE = {"bfloat16": 2.0**-14 / 24, "float16": 2.0**-20 / 24}
# a rounded model's residual may be up to this many times its expected rounding energy before the check on its
# values (:func:`on_merge_grid`): the mean of two bfloat16 values is a tie half the time, rounded by ulp / 2, so
# its energy is ulp^2 / 8, 1.5x the ulp^2 / 12 of an even spread (a 50/50 merge of two 1B bfloat16 fine-tunes:
# 1.67x the estimate)
ROUNDED_SLACK = 2.5
# a segment with a weight per layer this far off (over the nearest-neighbour distance) may be SLERP, a curve
# (sin((1 - t) theta) A + sin(t theta) B) / sin(theta) that bends off the chord by ~0.003 a degree between the
# tensors: such a model is a merge if its values are a A + b B per layer (:func:`on_merge_grid`, ``conic``)
CURVE_TOL = 0.25


class Merge(NamedTuple):
    """``child`` is ``sum(weights[i] * model parents[i])`` (weights sum to 1), off it by ``residual`` (over the
    distance from the child to its nearest other model). ``per_layer``: for a merge of two models with a weight
    per layer (mergekit's layer gradients, SLERP per tensor), the first parent's weight in each layer, and
    ``weights`` their mean; empty for one weight throughout."""

    child: int
    parents: tuple[int, ...]
    weights: tuple[float, ...]
    residual: float
    per_layer: tuple[float, ...] = ()
    curve: bool = False  # a per-layer segment up to CURVE_TOL off: SLERP, to be checked value by value as a A + b B
    alt: Merge | None = None  # a rounded line's plane within tol: checked when the line's values say no


def find_merges(sq: np.ndarray, keep: list[int], rounding: np.ndarray | None = None, tol: float = MERGE_TOL,
                k: int = NEIGHBOURS, layers: np.ndarray | None = None,
                verify: Callable[[Merge], bool] | None = None) -> list[Merge]:
    """The merges among ``keep`` (indices into the squared distances ``sq`` (N, N)), best fit first, each with
    parents that are no merges themselves. A model is a merge when its best line (two parents, weights in
    [:data:`MIN_WEIGHT`, 1 - it]) or plane (a base plus two models, both added with weight >= MIN_WEIGHT) leaves
    a residual of at most ``tol`` of its nearest-neighbour distance; with ``layers`` (L, N, N), each layer's
    squared distances, a segment with a weight per layer (:func:`_layer_line_fit`) is tried too. ``rounding``
    (N,): each model's expected rounding energy on the scale of ``sq`` (0 for float32); a rounded model is
    judged with :data:`ROUNDED_SLACK` times it taken out of its residual, and is a merge only when ``verify``
    says its values are (:func:`on_merge_grid`). Greedy: of the fits within ``tol`` the one with the mildest
    weights is taken (:func:`_mildest`), it leaves the pool of parents, and the fits made among it are made
    again. Time O(N k^2 F) for the first round, O(F k^2 F) a merge found after (k = :data:`NEIGHBOURS`,
    F = :data:`FAR`)."""
    pool, found, settled = list(keep), [], set()
    noise = np.zeros(len(sq)) if rounding is None else ROUNDED_SLACK * np.asarray(rounding, dtype=np.float64)
    cache: dict[int, tuple[Merge | None, set[int]]] = {}  # model -> its fit, the models it was fitted among
    while len(pool) >= 3:
        for m in pool:
            if m not in settled and m not in cache:
                others = [j for j in pool if j != m]
                near, far = _neighbours(sq, m, others, k)
                cache[m] = (_fit_among(sq, m, near, far, noise[m], tol, layers), set(far.tolist()))
        fits = [f for m, (f, _) in cache.items() if m not in settled and f is not None and (f.residual <= tol or f.curve)]
        if not fits:
            break
        first = min(fits, key=_mildest)
        best = _unmirrored(sq, first, pool, noise, tol, k)
        if best is not None and (noise[best.child] > 0 or best.curve):  # its values must say so
            alt = None if best.alt is None else _unmirrored(sq, best.alt, pool, noise, tol, k)
            best = next((f for f in (best, alt) if f is not None and verify is not None and verify(f)), None)
        if best is None:
            settled.add(first.child)  # a parallelogram nothing else tells, or a rounded model whose values say no
            continue
        best = best._replace(alt=None)
        found.append(best)
        pool.remove(best.child)
        # only fits made among the merge just taken change: a model's candidates are its FAR nearest in the pool
        cache = {m: c for m, c in cache.items() if m != best.child and best.child not in c[1]}
    return found


def _neighbours(sq: np.ndarray, m: int, others: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the k nearest, the :data:`FAR` nearest) of ``others`` to ``m``, nearest first (stable). O(N log N)."""
    others = np.asarray(others)
    order = np.argsort(sq[m, others], kind="stable")
    return others[order[:k]], others[order[:FAR]]


def _mildest(fit: Merge) -> tuple:
    """Sort key: lines before planes (a plane through a line merge and its parents fits any merge of theirs:
    the linear merge is taken first, so a task-arithmetic one is not made its child), then the smallest largest
    |weight|. With a merge among them, its parents are weighted sums of the others too (three points on a line,
    four in a plane): A = (M - (1 - t) B) / t. The merge is the average (weights within [0, 1] on a line); its
    parents need weights over 1."""
    return len(fit.parents), round(max(abs(w) for w in fit.weights), 6), fit.residual, fit.child


def _unmirrored(sq: np.ndarray, fit: Merge, pool: list[int], noise: np.ndarray, tol: float, k: int) -> Merge | None:
    """``fit``, or its mirror, or None. A task-arithmetic merge at weights 1 and 1, M = A + B - P, makes a
    parallelogram with its base P: P fits the plane of M, A, B as exactly and as mildly as M fits that of P, A,
    B (at other weights the merge's are the milder: 0.8, 0.8 against 1.33, 1.33 for its base). The base
    is the one with fine-tunes of its own around it: the nearest model of a model other than the four. When
    exactly one of the two is, the other is the merge; else neither is taken. Time O(P^2 + k^3)."""
    if len(fit.parents) != 3:
        return fit
    base, rest = fit.parents[0], set(fit.parents[1:])
    mirror = best_fit(sq, base, [j for j in pool if j != base], noise[base], tol, k)
    if mirror is None or mirror.residual > tol or len(mirror.parents) != 3 or mirror.parents[0] != fit.child \
            or set(mirror.parents[1:]) != rest or _mildest(mirror)[1] > _mildest(fit)[1] + 1e-3:
        return fit  # no mirror, or a milder fit than its mirror's (weights 0.8, 0.8 against 1.33, 1.33)
    four = {fit.child, base, *rest}
    near = _nearest(sq, pool)
    owns = {x: any(n == x and j not in four for j, n in near.items()) for x in (fit.child, base)}
    if owns[base] != owns[fit.child]:
        return mirror if owns[fit.child] else fit
    return None


def _nearest(sq: np.ndarray, pool: list[int]) -> dict[int, int]:
    """Each model of ``pool`` -> its nearest other model of ``pool``. Time O(P^2)."""
    ix = np.asarray(pool)
    d = sq[np.ix_(ix, ix)].astype(np.float64)  # (P, P)
    np.fill_diagonal(d, np.inf)
    return dict(zip(pool, ix[d.argmin(1)].tolist()))


def best_fit(sq: np.ndarray, m: int, others: list[int], noise: float = 0.0, tol: float = MERGE_TOL,
             k: int = NEIGHBOURS, layers: np.ndarray | None = None) -> Merge | None:
    """The line, else the plane, near ``m`` that passes nearest it (through its k nearest ``others`` and any
    of its :data:`FAR` nearest: :func:`_line_fit`, :func:`_plane_fit`), as a :class:`Merge` whose residual is over m's
    nearest-neighbour distance (``noise``: m's rounding energy, taken out first). A line within ``tol`` wins over
    a plane (fewer parents; a plane through its two ends and any base fits as well) unless the plane explains
    what it leaves (:func:`_explains`). None with fewer than two others or no fit. Time O(k^2 F)."""
    return None if len(others) < 2 else _fit_among(sq, m, *_neighbours(sq, m, others, k), noise, tol, layers)


def _fit_among(sq: np.ndarray, m: int, near: np.ndarray, others: np.ndarray, noise: float, tol: float,
               layers: np.ndarray | None) -> Merge | None:
    """:func:`best_fit` of ``m`` given its ``near`` and :data:`FAR` nearest (``others``) candidates."""
    if len(others) < 2:
        return None
    d_nn = float(sq[m, near[0]])
    if d_nn <= 0:
        return None  # a copy (lineage.copies)
    line, plane = (None if (got := fit(sq, m, near, others, d_nn)) is None else
                   Merge(m, got[0], got[1], float(np.sqrt(max(got[2] - noise, 0.0) / d_nn)))
                   for fit in (_line_fit, _plane_fit))
    layered = None if layers is None else _layer_merge(layers, m, near, others, noise, d_nn)
    rivals = [f for f in (plane, layered) if f is not None]
    if line is not None and line.residual <= tol and not any(_explains(line, f, tol) for f in rivals):
        # rounded, task arithmetic whose base weighs ~0.02 fits the line of its fine-tunes too, and only its values
        # tell the plane (two bfloat16 merges of the held-out zoos of session 36)
        rounded_plane = noise > 0 and plane is not None and plane.residual <= tol
        return line._replace(alt=plane) if rounded_plane else line
    fits = [f for f in (line, *rivals) if f is not None]
    best = min(fits, key=lambda f: f.residual) if fits else None
    if best is not None and best.residual > tol and layered is not None and layered.residual <= CURVE_TOL:
        return layered._replace(curve=True)  # SLERP, perhaps: for the value check
    return best


def _layer_merge(layers: np.ndarray, m: int, near: np.ndarray, others: np.ndarray, noise: float,
                 d_nn: float) -> Merge | None:
    """:func:`_layer_line_fit` as a :class:`Merge` (weights: the first parent's mean weight and the rest)."""
    got = _layer_line_fit(layers, m, near, others)
    if got is None:
        return None
    t = got[1]
    return Merge(m, got[0], (float(t.mean()), float(1 - t.mean())), float(np.sqrt(max(got[2] - noise, 0.0) / d_nn)),
                 tuple(float(x) for x in t))


def _layer_line_fit(layers: np.ndarray, m: int, near: np.ndarray, others: np.ndarray) -> tuple | None:
    """((a, b), t (L,), squared residual) of the best segment a-b with a weight t_l in [0, 1] per layer (a among
    m's ``near`` models, b among ``others``), from each layer's squared distances ``layers`` (L, N, N); None
    without candidates. Per layer t = <m - b, a - b> / |a - b|^2 clipped to [0, 1] (a layer where a and b are
    equal: 1/2, its residual m's distance to them). Time O(k F L)."""
    a, b = np.repeat(near, len(others)), np.tile(others, len(near))  # (C,) each
    a, b = a[a != b], b[a != b]
    if not len(a):
        return None
    dab, dmb, dma = layers[:, a, b].astype(np.float64), layers[:, m, b], layers[:, m, a]  # (L, C) each
    g = (dmb + dab - dma) / 2  # <m - b, a - b> per layer
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(dab > 0, np.clip(g / dab, 0.0, 1.0), 0.5)  # (L, C)
    r2 = (dmb - 2 * t * g + t**2 * dab).sum(0)  # (C,) ||m - (t a + (1 - t) b)||^2 over layers
    i = int(np.argmin(r2))
    return (int(a[i]), int(b[i])), t[:, i], float(r2[i])


def _explains(line: Merge, other: Merge, tol: float) -> bool:
    """Whether a plane fit, or a segment with a weight per layer, explains what the line fit leaves: the line's
    residual is no rounding-sized rest (over a fifth of ``tol``) and the other's is under a quarter of it. A
    task-arithmetic merge whose base has a small weight (0.08 on the base, 0.60 and 0.32 on two siblings) lies
    0.04 off their line and on the plane; an exact line merge is on all three, and stays a line (one weight)."""
    return line.residual > tol / 5 and other.residual < line.residual / 4


def _best(residual2: np.ndarray, weights: np.ndarray, ok: np.ndarray, d_nn: float) -> int:
    """Index of the best fit among ``ok``: the least squared residual, and among fits as good (within 1e-4 of
    the nearest-neighbour distance^2: exact ones) the mildest weights (largest |weight| least). Several lines
    can pass exactly through a merge when another merge of its parents is given: a soup 0.5 A + 0.5 B is 5/8 of
    the way from P to P + 0.8 (A - P) + 0.8 (B - P) too; its own parents weigh it mildest."""
    idx = np.flatnonzero(ok)
    tied = idx[residual2[idx] <= residual2[idx].min() + 1e-4 * d_nn]
    return int(tied[np.argmin(np.abs(weights[tied]).max(1))])


def _line_fit(sq: np.ndarray, m: int, near: np.ndarray, others: np.ndarray, d_nn: float) -> tuple | None:
    """((a, b), (w_a, w_b), squared residual) of the best segment a-b for model m, a among its ``near`` models
    and b any of ``others`` (a merge's nearer parent is near it; the other may be a cousin far off), or None.
    m - b = t (a - b): t = <m - b, a - b> / |a - b|^2 from the three squared distances."""
    a, b = np.repeat(near, len(others)), np.tile(others, len(near))  # (C,) each, C = k N
    a, b = a[a != b], b[a != b]
    dab, dmb, dma = sq[a, b], sq[m, b], sq[m, a]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (dmb + dab - dma) / (2 * dab)  # (C,)
        r2 = dmb - t**2 * dab
    ok = (dab > 0) & (t >= MIN_WEIGHT) & (t <= 1 - MIN_WEIGHT)
    if not ok.any():
        return None
    i = _best(r2, np.stack([t, 1 - t], 1), ok, d_nn)
    return (int(a[i]), int(b[i])), (float(t[i]), float(1 - t[i])), float(r2[i])


def _plane_fit(sq: np.ndarray, m: int, near: np.ndarray, others: np.ndarray, d_nn: float) -> tuple | None:
    """((p, a, b), (1 - x - y, x, y), squared residual) of the best plane m - p = x (a - p) + y (b - p) with
    x, y in [:data:`MIN_WEIGHT`, :data:`MAX_WEIGHT`] (both updates added), p and a among m's ``near`` models and
    b any of ``others``, or None. The 2 x 2 normal equations from the six squared distances (law of cosines),
    all triples at once."""
    pa = np.array([(p, a) for p in near.tolist() for a in near.tolist() if p != a])  # (k (k - 1), 2)
    if not len(pa):
        return None
    p, a = np.repeat(pa[:, 0], len(others)), np.repeat(pa[:, 1], len(others))  # (T,) each, T = k (k - 1) N
    b = np.tile(others, len(pa))  # (T,)
    keep = (b != p) & (b != a)
    p, a, b = p[keep], a[keep], b[keep]
    g11, g22 = sq[p, a], sq[p, b]
    g12 = (sq[p, a] + sq[p, b] - sq[a, b]) / 2  # <a - p, b - p>
    r1 = (sq[m, p] + sq[p, a] - sq[m, a]) / 2  # <m - p, a - p>
    r2 = (sq[m, p] + sq[p, b] - sq[m, b]) / 2
    det = g11 * g22 - g12**2
    with np.errstate(divide="ignore", invalid="ignore"):
        x = (r1 * g22 - r2 * g12) / det
        y = (r2 * g11 - r1 * g12) / det
        res = sq[m, p] - (x * r1 + y * r2)
        w = np.stack([1 - x - y, x, y], 1)  # (T, 3)
    ok = (det > MIN_SIN2 * g11 * g22) & (x >= MIN_WEIGHT) & (y >= MIN_WEIGHT) & (x <= MAX_WEIGHT) & (y <= MAX_WEIGHT)
    if not ok.any():
        return None
    i = _best(res, w, ok, d_nn)
    return (int(p[i]), int(a[i]), int(b[i])), (float(1 - x[i] - y[i]), float(x[i]), float(y[i])), float(res[i])


def split_merges(members: list, layers: list, st, keep: list[int], found: dict[str, dict],
                 rows: SampledRows | None = None) -> list[int]:
    """``keep`` less the merges among the checkpoints ``members`` (:func:`find_merges` on the pass's squared
    distances ``st.excess``), each recorded in ``found``: name -> {"parents": names, "weights": floats,
    "residual": float, "kurtosis": its summed kurtosis, "rms": its RMS distance to its most weighted parent
    (:func:`main_parent`), "per_layer" (a weight per compared layer, from the distances) and "per_tensor" (a
    value check's weights, and SLERP's t, per sampled tensor: :func:`~.merge_values.merge_fit`) where they
    apply}; a model stored at bfloat16 / float16 must pass :func:`on_merge_grid` on the compared ``layers``
    (their sampled rows read through ``rows``, shared with the TIES / DARE fit, or a cache of its own). Quantized models (their rounding energy taken out of ``st.excess``, whose diagonal it leaves
    negative) are neither merges nor parents here: a stand-in's rounding is no float rounding, and a model made
    from a quantized one is found by other means (:mod:`.quantized`); the float models beside them are searched.
    Time that of :func:`find_merges`, plus O(sampled rows) a rounded candidate."""
    if st.excess is None or st.norms2 is None:
        return keep
    floats = [i for i in keep if st.excess[i, i] >= 0]
    fmts = st.value_formats or [""] * len(members)
    share = np.array([ROUNDING_SHARE.get(fmt, 0.0) for fmt in fmts])
    grid = verify_grid(layers)
    fitted: dict[tuple, dict] = {}  # (child, parents) -> the value check's fit per tensor (merge_fit)
    verify = _value_check(members, grid, fmts, rows or SampledRows(members, grid), fitted)
    index = {ck.name: i for i, ck in enumerate(members)}
    merges = find_merges(st.excess, floats, share * st.norms2, layers=None if not st.layer_sq else np.stack(st.layer_sq),
                         verify=verify)
    for m in merges:
        rec = {"parents": [members[p].name for p in m.parents], "weights": [round(w, 6) for w in m.weights],
               "residual": round(m.residual, 6), "kurtosis": float(st.kurtosis[m.child]),
               **({"per_layer": [round(t, 4) for t in m.per_layer]} if m.per_layer else {}),
               **({"per_tensor": fitted[m.child, m.parents]} if (m.child, m.parents) in fitted else {})}
        found[members[m.child].name] = {**rec, "rms": float(st.rms[m.child, index[main_parent(rec)]])}
    merged = {m.child for m in merges}
    return [i for i in keep if i not in merged]


def _value_check(members: list, grid: list, fmts: list[str], read: Callable, fitted: dict) -> Callable[[Merge], bool]:
    """find_merges' ``verify``: whether a candidate's values are its parents' weighted sum (:func:`merge_fit` on
    the sampled rows of ``grid``, ``read`` them), its fit per tensor put in ``fitted`` by (child, parents)."""

    def verify(m: Merge) -> bool:
        child, parents, fmt = members[m.child], [members[p] for p in m.parents], fmts[m.child] or "float32"
        got = merge_fit(child, parents, grid, fmt, bool(m.per_layer), m.curve, read)
        if got is None and len(parents) == 2 and not m.curve:
            # SLERP near its chord, rounded: the distances take it for a line merge, and its values are no one
            # weighted sum (its weights differ per tensor and sum to a little over 1: 1.002 for tensors 8 degrees apart)
            got = merge_fit(child, parents, grid, fmt, True, True, read)
        if got:
            fitted[m.child, m.parents] = got
        return got is not None

    return verify


def main_parent(record: dict) -> str:
    """The parent a merge is drawn under: its most weighted one (the first of equals), or the one a declared
    merge names (``"main"``: :mod:`.declared`)."""
    if record.get("main"):
        return record["main"]
    w = record["weights"]
    return record["parents"][max(range(len(w)), key=lambda i: (w[i], -i))]

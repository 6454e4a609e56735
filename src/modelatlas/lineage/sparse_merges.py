"""TIES and DARE merges found from the values: a model M that is, value by value, its base P moved by a trimmed or
thinned sum of two fine-tunes' task vectors tau_A = A - P, tau_B = B - P (mergekit's ``ties``, ``dare_ties``,
``dare_linear``). Such a merge is no weighted sum of its parents (:mod:`.merges` finds those): each value of
M - P is 0 (both dropped), alpha tau_A or beta tau_B (one kept), or gamma tau_A + eta tau_B (both kept), with one
alpha, beta, gamma, eta for the model (TIES, normalized: 1, 1 and the weights' shares; DARE: w / density, and
gamma, eta = alpha, beta). A fine-tune's values obey no such rule.

Checking every triple value by value took 15-67 s on a 39-model zoo (docs/benchmarks.md, session 35), so three
screens come first, each cheaper than the next, on the values the pass kept (``PairStats.samples``, about
:data:`SCREEN_VALUES` a model: no file is read again):

1. exact equality: a merge keeps some of its values exactly (P's where both were dropped, A's where only A's
   were kept by TIES); M must equal P, A or B on :data:`MIN_EQUAL` of them (a model equal to none of its
   :data:`NEIGHBOURS` nearest, as a checkpoint of a run or any fine-tune without dead units, builds no triple);
2. distances (O(1) a triple): the plane through P, A, B explains at least :data:`MIN_EXPLAINED` of |M - P|^2
   (the kept values carry most of each task vector's energy), P, A and B among M's nearest;
3. the rule, loosely: TIES's (each value 0, A's, B's or between them) or DARE's with alpha, beta read from the
   distances (:func:`_dare_scales`), or where those fail from the values (:func:`_pair_modes`: DARE-TIES's
   sign election drops energy the distances' density reads), within :data:`DARE_TOL`, on
   :data:`SCREEN_SHARE` of the values where A or B moved.

What is left is fitted on the rows the value check of :mod:`.merge_values` reads (:func:`classify`): alpha and
beta by an interval sweep, gamma and eta on the values neither explains, and :data:`SPARSE_SHARE` of the values
where A or B moved must be classed within rounding. A model keeps its best fit (:func:`_order`) that takes no
other merge as a parent (:func:`_disjoint`). Time O(N (N + k S)) for the screens (k = :data:`NEIGHBOURS`, S
the kept values), O(N k^3 S + N k^2 S log S) at worst when models share values, O(V log V) a fitted triple (V sampled
values); memory O(N S) plus the fitted candidates' V values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from modelatlas.lineage.merge_values import (
    MIN_TELLING,
    VERIFY_LAYERS,
    SampledRows,
    SampledValues,
    sweep_weight,
    verify_grid,
)
from modelatlas.lineage.value_formats import ValueSamples

NEIGHBOURS = 10  # P, A and B among M's 10 nearest (the development merges' parents: up to the 9th)
MIN_EXPLAINED = 0.25  # of |M - P|^2 in the plane of P, A, B (development merges: 0.31-0.97)
MIN_EQUAL = 0.005  # of the screened values of M equal to P's, A's or B's
SCREEN_VALUES = ValueSamples.PER_LAYER * VERIFY_LAYERS  # sampled values the value screens read (256)
SCREEN_SHARE = 0.9  # of the values where A or B moved that the loose rule must explain
STAGE, STAGE_SHARE = 4, 0.75  # the value screen's first stage: every 4th value, 75 % (:func:`_staged_screen`)
DARE_TOL = 0.15  # relative: DARE's alpha and beta read from the distances are within ~12 % (DARE-linear)
RATIO_TOL = 0.01  # relative width of the ratios a DARE scale read from the values gathers (bfloat16: 0.4 %)
MAX_RATIO = 1e3  # ratios (M - P) / (A - P) beyond are no DARE scale (w / density: a few at most)
SPARSE_SHARE = 0.99  # of the values where A or B moved, classed within rounding
PRECHECKS = (128, 512, 4096)  # sampled values a fit is tried on, in turn, before the whole sample
BASE_TIE = 0.001  # fits of one model this close in share are told apart by the distance to their base
# of the values where a DARE merge's two scaled deltas disagree in sign and one or both were kept, the share kept
# as their sum: DARE-linear d / (2 - d) (0.18 at density 0.3), DARE-TIES none (the elected side alone)
LINEAR_SUMS = 0.03


_SHAPES: dict[int, np.ndarray] = {}  # k -> _shape(k)


class SparseMerge(NamedTuple):
    """``child`` is ``parents[0]`` (the base) plus the trimmed or thinned task vectors of ``parents[1:]``, with
    ``coefficients`` (alpha, beta, gamma, eta), ``share`` of its values classed; ``kind``: "ties",
    "dare_linear", "dare_ties" (mergekit's names; :func:`_dare_kind`), "dare" (DARE, too few values to tell
    which) or "sparse" (neither's coefficients)."""

    child: int
    parents: tuple[int, int, int]
    coefficients: tuple[float, float, float, float]
    share: float
    kind: str


def find_sparse_merges(sq: np.ndarray, pool: list[int], screen: Callable[[int], np.ndarray | None],
                       values: Callable[[int], np.ndarray | None], half: Callable[[int], np.ndarray]) -> list[SparseMerge]:
    """The TIES / DARE merges among ``pool`` (indices into the squared distances ``sq``), best share first, none a
    parent of another. ``screen(i)``: a few of model i's values (about :data:`SCREEN_VALUES`), ``values(i)``: its
    sampled values (V,), float64, each the same positions for all models (None: unreadable; called often: cache
    them); ``half(i)``: the rounding allowed on each of ``values(i)``. Time: see the module."""
    fits: dict[int, list[SparseMerge]] = {}
    for m in pool:
        hm = None  # half(m), once a model (an ldexp of its V values), where a triple of it is fitted
        for trip in screened(sq, m, [i for i in pool if i != m], screen):
            rows = [values(i) for i in (m, *trip)]
            if any(r is None for r in rows):
                continue
            hm = half(m) if hm is None else hm
            got = _classified(rows, hm)
            if got is not None and got[1] >= SPARSE_SHARE:
                kind = _kind(got[0])
                kind = _dare_kind(*rows, hm, got[0][:2]) if kind == "dare" else kind
                fits.setdefault(m, []).append(SparseMerge(m, trip, got[0], got[1], kind))
    return _disjoint({m: _order(f, sq) for m, f in fits.items()})


def _classified(rows: list[np.ndarray], half: np.ndarray) -> tuple | None:
    """:func:`classify` of the rows (m, p, a, b), first on :data:`PRECHECKS` evenly spaced values of them in turn: a
    triple that classes under :data:`SCREEN_SHARE` on one is no merge (99 % are needed) and is not fitted on more
    (the whole fit, 8 sweeps of ~260k values, took 0.4 s a triple: 130 triples of 8 bfloat16 fine-tunes of one
    base passed the screens, 57 s; at 4,096 values 9 ms a triple, and 239 triples of a 21-model zoo without
    merges, classed 24-35 % there, took 2.1 s). A stage where too few values moved to tell (None) passes to the
    next. O(sum of the stages' S log S), then O(V log V) for the triples that pass."""
    for size in PRECHECKS:
        if size >= len(half):
            break
        pick = np.linspace(0, len(half) - 1, size).round().astype(int)
        quick = classify(*(r[pick] for r in rows), half[pick])
        if quick is not None and quick[1] < SCREEN_SHARE:
            return quick
    return classify(*rows, half)


def _rank(fit: SparseMerge) -> tuple:
    """Sort key: a recipe's coefficients (TIES's, DARE's) before others, then the larger share. Another merge
    among the candidates fits too: a TIES merge of A and B on P reads, on base B with A and a merge that holds
    B's values, as alpha = beta = 0.40, gamma = 1, eta = 0 (every value classed; a held-out zoo, seed 82)."""
    return fit.kind == "sparse", -fit.share, fit.child


def _order(fits: list[SparseMerge], sq: np.ndarray) -> list[SparseMerge]:
    """One model's fits, best first (:func:`_rank`), those within :data:`BASE_TIE` of the best share (and of its
    class) with the base nearest both models first (the least |A - P|^2 + |B - P|^2). The values cannot tell the
    base where other models equal it wherever the merge kept it: a TIES merge classed 99.9-100 % of its values
    on six or seven bases (held-out seeds 82 and 88, CNN: only two compared 2-D layers). Nor can the distance to
    the merge (seed 88: a child of one model was nearer the merge than the true base). In a tree the models'
    common ancestor lies on the path between them, where the sum of distances to both is least."""
    ranked = sorted(fits, key=_rank)
    best = ranked[0]
    tied = [f for f in ranked if (f.kind == "sparse") == (best.kind == "sparse") and f.share >= best.share - BASE_TIE]
    span = {f: sq[f.parents[0], f.parents[1]] + sq[f.parents[0], f.parents[2]] for f in tied}
    return sorted(tied, key=lambda f: (span[f], f.parents)) + [f for f in ranked if f not in tied]


def _disjoint(fits: dict[int, list[SparseMerge]]) -> list[SparseMerge]:
    """One fit a model (``fits``: model -> its fits, best first), models by their best fit: the first fit that
    takes no merge kept before as a parent and is no parent of one. O(F^2) for F fits."""
    kept: list[SparseMerge] = []
    for m in sorted(fits, key=lambda m: _rank(fits[m][0])):
        for f in fits[m]:
            if not any(f.child in k.parents or k.child in f.parents for k in kept):
                kept.append(f)
                break
    return kept


def screened(sq: np.ndarray, m: int, others: list[int], screen: Callable[[int], np.ndarray | None]) -> list[tuple]:
    """The triples (P, A, B) of m's :data:`NEIGHBOURS` nearest ``others`` that pass the three screens for merge
    ``m`` (``screen(i)``: model i's screened values), the most values explained first. O(N + k^3 SCREEN_VALUES)."""
    others = np.asarray(others)
    dist = sq[m, others]
    part = np.argpartition(dist, min(NEIGHBOURS, len(others)) - 1)[:NEIGHBOURS]  # O(N), not a sort of N
    near = others[part[np.argsort(dist[part], kind="stable")]]  # (k,) nearest first
    mv = screen(m)
    readable = np.array([screen(i) is not None for i in near.tolist()], dtype=bool)
    if mv is None or readable.sum() < 3:
        return []
    sub = np.stack([screen(i) if r else np.full(len(mv), np.nan) for i, r in zip(near.tolist(), readable)])  # (k, S)
    equal = np.where(readable, (sub == mv).mean(1), 0.0)  # (k,) share of M's values equal to each
    # M equal to P, A or B on MIN_EQUAL of the values needs the three's shares to sum to it (a union is no more):
    # a model equal to none of its nearest (a checkpoint of a run, any float fine-tune) costs no triple
    if np.sort(equal)[-3:].sum() < MIN_EQUAL:
        return []
    pos, alpha, beta = _distance_triples(sq, m, near)  # (T, 3) positions in near
    ok = readable[pos].all(1) & (equal[pos].sum(1) >= MIN_EQUAL)
    if not ok.any():
        return []
    score = _staged_screen(mv, sub, pos[ok], alpha[ok], beta[ok])
    order = [i for i in np.argsort(-score, kind="stable") if score[i] >= SCREEN_SHARE]
    return [tuple(near[pos[ok][i]].tolist()) for i in order]


def _staged_screen(mv: np.ndarray, sub: np.ndarray, trip: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """(T,) :func:`_value_screen` of the triples ``trip`` (T, 3) (positions in ``sub`` (k, S), m's nearest models'
    values; ``mv`` (S,) m's), first on every :data:`STAGE`-th value with DARE's scales read there, then, for the
    triples that explain :data:`STAGE_SHARE` of those, on all S (0 for the others). The trained zoos' models share
    many exact values (dead units), so most of a model's triples reach this screen, and every one failed it on a
    200-model zoo without merges (45,093 triples, 0.3 s of the recovery's ~1.2 s). O(T S / STAGE + k^2 S log S / STAGE),
    then O(T' S + k^2 S log S) for the T' triples that pass the first stage."""
    def screen(values: np.ndarray, rows: np.ndarray, at: np.ndarray) -> np.ndarray:
        modes = _pair_modes(values, rows)  # (k, k): DARE's scale of A over base P, read from the values
        return _value_screen(values, rows[trip[at]], alpha[at], beta[at],
                             (modes[trip[at, 0], trip[at, 1]], modes[trip[at, 0], trip[at, 2]]))  # rows[...]: (T, 3, S)

    score = np.zeros(len(trip))
    live = np.flatnonzero(screen(mv[::STAGE], sub[:, ::STAGE], np.arange(len(trip))) >= STAGE_SHARE)
    if len(live):
        score[live] = screen(mv, sub, live)
    return score


def _pair_modes(mv: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """(k, k): for base P = row i and model A = row j of ``sub`` (k, S), the ratio (M - P) / (A - P) most of M's
    values ``mv`` (S,) share (:func:`_ratio_modes`; NaN on the diagonal). Per pair, not per triple: O(k^2 S log S)."""
    k = len(sub)
    d = np.broadcast_to(mv - sub[:, None, :], (k, k, sub.shape[1])).reshape(k * k, -1)  # (k k, S)
    t = (sub[None, :, :] - sub[:, None, :]).reshape(k * k, -1)  # (k k, S): A - P
    return _ratio_modes(d, t).reshape(k, k)


def _shape(k: int) -> np.ndarray:
    """(T, 3) positions (p, a, b) among k neighbours, all distinct, a < b. O(k^3)."""
    r = np.arange(k)
    p, a, b = (g.ravel() for g in np.meshgrid(r, r, r, indexing="ij"))  # (k^3,) each
    keep = (p != a) & (p != b) & (a < b)
    return np.stack([p[keep], a[keep], b[keep]], 1)


def _distance_triples(sq: np.ndarray, m: int, near: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T, 3) positions in ``near`` (m's nearest models) of the triples (P, A, B), A before B in the models'
    order, whose plane explains :data:`MIN_EXPLAINED` of |M - P|^2, and DARE's alpha, beta (T,) each
    (:func:`_dare_scales`). O(k^3)."""
    pos = _SHAPES.setdefault(len(near), _shape(len(near))).copy()  # (T, 3)
    swap = near[pos[:, 1]] > near[pos[:, 2]]
    pos[swap, 1:] = pos[swap, 2:0:-1]  # A before B in the models' order, whatever their distance
    trips = near[pos]  # (T, 3) models
    p, a, b = trips.T
    g11, g22 = sq[p, a], sq[p, b]
    g12 = (g11 + g22 - sq[a, b]) / 2  # <A - P, B - P>
    r1 = (sq[m, p] + g11 - sq[m, a]) / 2  # <M - P, A - P>
    r2 = (sq[m, p] + g22 - sq[m, b]) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        det = g11 * g22 - g12**2
        x, y = (r1 * g22 - r2 * g12) / det, (r2 * g11 - r1 * g12) / det
        explained = (x * r1 + y * r2) / sq[m, p]
        alpha, beta = _dare_scales(sq[m, p], x, y, g11, g22, g12)
    ok = (det > 0) & (sq[m, p] > 0) & (explained >= MIN_EXPLAINED)
    return pos[ok], alpha[ok], beta[ok]


def _dare_scales(mm, x, y, g11, g22, g12):
    """DARE's alpha, beta = w / d from the plane's weights x, y (~w: the drops are orthogonal to the plane on
    average) and the energy they leave: E|M - P|^2 = (x^2 |tau_A|^2 + y^2 |tau_B|^2) / d + 2 x y <tau_A, tau_B>
    (a value kept with probability d is scaled by 1 / d). NaN where that reads no density in (0, 1]."""
    d = (x**2 * g11 + y**2 * g22) / (mm - 2 * x * y * g12)
    d = np.where((d > 0) & (d <= 1.05), d, np.nan)
    return x / d, y / d


def _value_screen(mv: np.ndarray, x: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                  scales: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(T,) the share of the values where A or B moved that TIES's rule (M is P's, A's or B's value, or between
    A's and B's where both moved one way) or DARE's, loosely (M - P within :data:`DARE_TOL` of 0, alpha (A - P),
    beta (B - P) or their sum), explains, for M's values ``mv`` (S,) and the triples' (T, 3, S); 0 where M
    equals none of P, A, B on :data:`MIN_EQUAL` of them (checked first: the rest only for those left). DARE's
    alpha, beta (T,) each as the distances read them, and where those fail as the values do (``scales``, else
    :func:`_ratio_modes` of each triple). O(T S), O(T S log S) without ``scales``."""
    p, a, b = x[:, 0], x[:, 1], x[:, 2]  # (T, S) each
    equal = (mv == p) | (mv == a) | (mv == b)
    score = np.zeros(len(x))
    live = np.flatnonzero(equal.mean(1) >= MIN_EQUAL)
    if not len(live):
        return score
    p, a, b, equal = p[live], a[live], b[live], equal[live]
    moved = (a != p) | (b != p)
    up_a, up_b = a > p, b > p
    ties = equal | ((up_a == up_b) & (a != p) & (b != p) & (mv >= np.minimum(a, b)) & (mv <= np.maximum(a, b)))
    d, ta, tb = (mv - p).astype(np.float32), (a - p).astype(np.float32), (b - p).astype(np.float32)
    n = np.maximum(moved.sum(1), 1)
    best = np.maximum((ties & moved).sum(1), (_dare_rule(d, ta, tb, alpha[live], beta[live]) & moved).sum(1))
    # where neither explains enough, DARE's scales as the values read them (:func:`_ratio_modes`): the distances'
    # density is off for DARE-TIES (it drops the smaller of two kept deltas of opposite signs), and by chance
    low = np.flatnonzero(best < SCREEN_SHARE * n)
    if len(low):
        d, ta, tb, moved = d[low], ta[low], tb[low], moved[low]
        va, vb = (_ratio_modes(d, ta), _ratio_modes(d, tb)) if scales is None else (v[live][low] for v in scales)
        rule = _dare_rule(d, ta, tb, va, vb)
        best[low] = np.maximum(best[low], (rule & moved).sum(1))
    score[live] = best / n
    return score


def _dare_rule(d: np.ndarray, ta: np.ndarray, tb: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """(T, S) whether each value of M - P (``d``) is DARE's, loosely: within :data:`DARE_TOL` of 0, alpha (A - P),
    beta (B - P) or their sum (alpha, beta (T,) a triple). O(T S)."""
    al, be, tol = alpha[:, None].astype(np.float32), beta[:, None].astype(np.float32), DARE_TOL * np.abs(d)
    return (d == 0) | (np.abs(d - al * ta) <= tol) | (np.abs(d - be * tb) <= tol) | (np.abs(d - al * ta - be * tb) <= tol)


def _ratio_modes(d: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(T,) per row of ``d`` and ``t`` (T, S) the ratio d / t that the most values share within :data:`RATIO_TOL`
    (relative; their mean): a DARE merge's scale w / density, which every value only that model kept has
    (d (1 - d) of them); NaN for a row without a ratio. One search over all rows, each shifted to a range of
    its own. O(T S log S)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where((t != 0) & (d != 0), d / t, np.nan).astype(np.float64)  # (T, S)
    r[~(np.abs(r) <= MAX_RATIO)] = np.nan  # no DARE scale: w / density is a few at most
    r = np.sort(r, 1)  # NaN last
    valid = ~np.isnan(r)
    shift = 4 * MAX_RATIO * np.arange(len(r))[:, None]  # (T, 1): row k in [shift - 2 MAX, shift + 2 MAX]
    flat = (np.where(valid, r, 2 * MAX_RATIO) + shift).ravel()  # (T S,) ascending
    hi = np.searchsorted(flat, (np.where(valid, r + RATIO_TOL * np.abs(r), 0) + shift).ravel(), "right")
    hi = hi.reshape(r.shape) - r.shape[1] * np.arange(len(r))[:, None]  # (T, S) each window's end in its row
    count = np.where(valid, hi - np.arange(r.shape[1]), 0)
    i = count.argmax(1)  # (T,)
    sums = np.concatenate([np.zeros((len(r), 1)), np.cumsum(np.where(valid, r, 0), 1)], 1)  # (T, S + 1)
    rows = np.arange(len(r))
    end = hi[rows, i]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count[rows, i] > 0, (sums[rows, end] - sums[rows, i]) / count[rows, i], np.nan)


def classify(m: np.ndarray, p: np.ndarray, a: np.ndarray, b: np.ndarray, half: np.ndarray,
             least: int = MIN_TELLING) -> tuple | None:
    """((alpha, beta, gamma, eta), share): the coefficients that class the most values of d = m - p as 0, alpha
    (a - p), beta (b - p) or gamma (a - p) + eta (b - p) within ``half``, and the share of the values where a or b
    moved (by more than the rounding) so classed; None when fewer than ``least`` moved. alpha and beta by the interval sweep over the values that moved
    (:func:`~.merge_values.sweep_weight`, the overlap's middle; the zeros, a third or more of a merge's, would elect 0), gamma and eta on the values they
    leave, each swept in turn from least squares. NumPy throughout: torch's masked indexing of a few thousand
    values ran 60x slower on two busy threads. O(V log V)."""
    # values where a or b moved by more than the rounding: a one-unit step lands any sum onto a grid point of its
    # parents (the checkpoints of one bfloat16 run, 15 % of values a unit on between saves, read as TIES merges)
    moved = np.maximum(np.maximum(a, b), p) - np.minimum(np.minimum(a, b), p) > 3 * half
    if moved.sum() < least:
        return None
    d, ta, tb, h = m[moved] - p[moved], a[moved] - p[moved], b[moved] - p[moved], half[moved]
    nz = np.abs(d) > h
    # the middle of the best overlap: its end sits on the boundary of the values it counts, and loses some
    alpha, beta = sweep_weight(ta[nz], d[nz], h[nz], True), sweep_weight(tb[nz], d[nz], h[nz], True)
    one = ~nz | (np.abs(d - alpha * ta) <= h) | (np.abs(d - beta * tb) <= h)
    rest = np.flatnonzero(~one)
    gamma, eta = alpha, beta
    if len(rest) >= 3:  # two values fit any pair of weights: a third tests them
        dr, ar, br, hr = d[rest], ta[rest], tb[rest], h[rest]
        gamma, eta = np.linalg.lstsq(np.stack([ar, br], 1), dr, rcond=None)[0].tolist()  # (R, 2) on (R,)
        for _ in range(3):  # least squares is pulled by the values no pair explains; the sweep is not
            gamma = sweep_weight(ar, dr - eta * br, hr, True)
            eta = sweep_weight(br, dr - gamma * ar, hr, True)
        one[rest] = np.abs(dr - gamma * ar - eta * br) <= hr
    return (alpha, beta, gamma, eta), float(one.mean())


def _kind(c: tuple[float, float, float, float], tol: float = 0.01) -> str:
    """"ties" (alpha, beta 1 and gamma + eta 1: mergekit normalizes), "dare" (gamma, eta = alpha, beta: a
    rescaled sum of what was kept), else "sparse"."""
    alpha, beta, gamma, eta = c
    if abs(alpha - 1) <= tol and abs(beta - 1) <= tol and abs(gamma + eta - 1) <= tol:
        return "ties"
    if abs(gamma - alpha) <= tol * abs(alpha) and abs(eta - beta) <= tol * abs(beta):
        return "dare"
    return "sparse"


def _dare_kind(m: np.ndarray, p: np.ndarray, a: np.ndarray, b: np.ndarray, half: np.ndarray,
               scales: tuple[float, float]) -> str:
    """"dare_ties" or "dare_linear" for a DARE fit (``scales``: its alpha, beta) of the values m of p, a, b, or
    "dare" where too few values tell. Both kinds class a value as 0, alpha tau_A, beta tau_B or their sum; where
    alpha tau_A and beta tau_B disagree in sign and both were kept, DARE-linear keeps their sum and DARE-TIES the
    elected (larger) side alone. Among the values where the four candidates lie more than twice the rounding
    apart and the merge is one side or the sum (:data:`MIN_TELLING` of them needed), DARE-linear has the sum on
    d / (2 - d) of them (density d: 0.18 at 0.3), DARE-TIES on none: over :data:`LINEAR_SUMS` is linear. O(V)."""
    d, wa, wb = m - p, scales[0] * (a - p), scales[1] * (b - p)
    apart = (wa * wb < 0) & (np.abs(wa) > 2 * half) & (np.abs(wb) > 2 * half) & (np.abs(wa + wb) > 2 * half)
    summed = apart & (np.abs(d - wa - wb) <= half)
    one = apart & ((np.abs(d - wa) <= half) | (np.abs(d - wb) <= half))
    told = int(summed.sum() + one.sum())
    if told < MIN_TELLING:
        return "dare"
    return "dare_linear" if summed.sum() > LINEAR_SUMS * told else "dare_ties"


def split_sparse_merges(members: list, layers: list, st, keep: list[int], found: dict[str, dict],
                        rows: SampledRows | None = None) -> list[int]:
    """``keep`` less the TIES / DARE merges among the float models ``members`` (:func:`find_sparse_merges` on
    ``st.excess`` and :class:`~.merge_values.SampledValues` of up to :data:`~.merge_values.VERIFY_LAYERS` compared 2-D
    ``layers``), each recorded in ``found``: name -> {"parents": [base, A, B], "weights": None, "kind",
    "coefficients", "share", "residual": None, "main": the model of the larger both-kept coefficient,
    "kurtosis", "rms"}. Time: see the module."""
    if st.excess is None:
        return keep
    pool = [i for i in keep if st.excess[i, i] >= 0]
    grid = verify_grid(layers)
    if len(pool) < 4 or not grid or st.samples is None:
        return keep
    sampled = SampledValues(rows or SampledRows(members, grid), st.value_formats or [""] * len(members), st.samples)
    merges = find_sparse_merges(st.excess, pool, sampled.screen, sampled.values, sampled.half)
    for f in merges:
        names = [members[i].name for i in f.parents]
        main = 1 if f.coefficients[2] >= f.coefficients[3] else 2
        found[members[f.child].name] = {
            "parents": names, "weights": None, "kind": f.kind, "coefficients": [round(c, 6) for c in f.coefficients],
            "share": round(f.share, 6), "residual": None, "main": names[main], "kurtosis": float(st.kurtosis[f.child]),
            "rms": float(st.rms[f.child, f.parents[main]])}
    merged = {f.child for f in merges}
    return [i for i in keep if i not in merged]

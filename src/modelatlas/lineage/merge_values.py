"""The value check of a merge found from distances (:mod:`.merges`): are a model's values its parents' weighted
sum, rounded to its format, on sampled rows of the compared layers?

Where a merge is stored rounded (bfloat16 / float16) its residual off its parents' line or plane can be as large
as what tells a merge, and SLERP of far-apart tensors is a curve, not a segment; both are taken only when their
values say so: :data:`VERIFY_SHARE` of them within half a unit in the last place of one weighted sum (the weights
most values agree with, :func:`_agreeing`). Reads :data:`_SAMPLE_ROWS` rows of up to :data:`VERIFY_LAYERS` layers
of the candidate and its parents. Time O(sampled weights x log).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from modelatlas.errors import CheckpointError

VERIFY_SHARE = 0.99  # of the sampled values of a rounded merge within half a unit in the last place
VERIFY_LAYERS = 8  # compared layers sampled to check a rounded merge
MIN_TELLING = 64  # sampled values a merge's parents must tell apart (:func:`_telling`) for its check to say yes
_SAMPLE_ROWS = 64
MANTISSA = {"bfloat16": 7, "float16": 10, "float32": 23}
ULPS = {"float32": 4.0}  # a float32 merge computed in float32 (not float64): a few units off, not half of one


def on_merge_grid(child, parents: list, layers: list, fmt: str, per_layer: bool = False, conic: bool = False,
                  read=None) -> bool:
    """Whether ``child``'s values are a weighted sum of its ``parents``' rounded to ``fmt`` (bfloat16 / float16), on
    up to :data:`_SAMPLE_ROWS` evenly spaced rows of each of ``layers``: the weights refitted there by least
    squares (one set, or one a layer with ``per_layer``), and :data:`VERIFY_SHARE` of the values within half a
    unit in the last place of ``fmt`` (+1 %; float32: :data:`ULPS`) of that sum (``conic``: of a A + b B, the
    weights free, as SLERP's are). A fine-tune 0.2 % from a bfloat16 base lies within
    bfloat16's rounding of the mean of two others in squared distance, but not value by value (the small values'
    units are finer than its update). ``read(ck, t)``: the sampled rows (:func:`read_sampled`, or a cache of it).
    Time O(sampled weights)."""
    return merge_fit(child, parents, layers, fmt, per_layer, conic, read) is not None


def merge_fit(child, parents: list, layers: list, fmt: str, per_layer: bool = False, conic: bool = False,
              read=None) -> dict | None:
    """:func:`on_merge_grid`'s check, with what it fitted: None where the values say no; else, with ``per_layer``,
    each layer's name -> {"weights": the parents' weights there, "t": SLERP's interpolation factor toward the
    second parent (``conic`` with two parents: :func:`slerp_t`; else None)}, and {} for one weighted sum. Time
    O(sampled weights)."""
    read = read or read_sampled
    try:
        rows = [[read(ck, t) for ck in (child, *parents)] for t in layers]
    except CheckpointError:
        return None
    if not rows or fmt not in MANTISSA:
        return None
    groups = rows if per_layer else [[torch.cat([r[i] for r in rows]) for i in range(len(rows[0]))]]
    fits = [_fitted(g[0], g[1:], MANTISSA[fmt], ULPS.get(fmt, 0.505), conic) for g in groups]
    within = torch.cat([mask for mask, _ in fits])
    telling = torch.cat([_telling(g[0], g[1:], MANTISSA[fmt]) for g in groups])
    if int(telling.sum()) < MIN_TELLING or float(within[telling].double().mean()) < VERIFY_SHARE:
        return None
    if not per_layer:
        return {}
    return {t.name: {"weights": [round(w, 6) for w in ws],
                     "t": round(slerp_t(*g[1:], *ws), 6) if conic and len(ws) == 2 else None}
            for t, g, (_, ws) in zip(layers, groups, fits)}


def slerp_t(a: torch.Tensor, b: torch.Tensor, wa: float, wb: float) -> float:
    """SLERP's t (the weight of ``b``) that gives the weights ``wa`` a + ``wb`` b: SLERP's are sin((1 - t) theta) /
    sin(theta) and sin(t theta) / sin(theta), so sin(t theta) = wb sin(theta) and cos(t theta) = wa + wb
    cos(theta), theta the angle between ``a`` and ``b`` (here their sampled rows: the whole tensors' where a
    layer has at most :data:`_SAMPLE_ROWS` rows). Nearly parallel tensors: the chord's wb / (wa + wb). O(P)."""
    cos = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else 1.0
    theta = float(np.arccos(np.clip(cos, -1.0, 1.0)))
    if theta < 1e-6 or wa + wb == 0:
        return wb / (wa + wb) if wa + wb else 0.5
    return float(np.arctan2(wb * np.sin(theta), wa + wb * np.cos(theta)) / theta)


def _telling(y: torch.Tensor, parents: list[torch.Tensor], mantissa: int) -> torch.Tensor:
    """(P,) the values a weighted sum can be told by: its parents more than 1.5 units in the last place of ``y``
    apart. Where they are one unit apart any sum rounds onto one of them, within half a unit of a 50/50 mix: the
    checkpoints of one bfloat16 run, 15 % of values one unit on between saves, read as merges of their
    neighbours (session 36's hunt)."""
    ulp = torch.ldexp(torch.ones_like(y), torch.frexp(y.abs()).exponent - 1 - mantissa)  # (P,)
    stack = torch.stack(parents)  # (k, P)
    return (stack.max(0).values - stack.min(0).values) > 1.5 * ulp


def verify_grid(layers: list) -> list:
    """The compared layers a value check samples: the first :data:`VERIFY_LAYERS` 2-D ones."""
    return [t for t in layers if len(t.shape) == 2][:VERIFY_LAYERS]


def sample_rows(n: int) -> torch.Tensor:
    """Up to :data:`_SAMPLE_ROWS` evenly spaced row indices of ``n`` rows."""
    return torch.linspace(0, n - 1, min(n, _SAMPLE_ROWS)).round().long()


def _sampled(x: torch.Tensor) -> torch.Tensor:
    """:func:`sample_rows`'s rows of the 2-D ``x``, flattened, float64."""
    return x.reshape(len(x), -1)[sample_rows(len(x))].double().flatten()  # (rows picked x row length,)


def read_sampled(ck, t) -> torch.Tensor:
    """:func:`_sampled` of ``ck``'s 2-D tensor ``t``, reading those rows only (the pass read the whole layer
    already; safetensors and GGUF read a row's bytes and no more)."""
    return ck.read_rows(t.name, sample_rows(t.shape[0])).double().flatten()  # (rows picked x row length,)


def _within_ulp(y: torch.Tensor, parents: list[torch.Tensor], mantissa: int, ulps: float = 0.505,
                conic: bool = False) -> torch.Tensor:
    """(P,) whether each value of ``y`` is within half a unit in the last place (+1 %) of one weighted sum of its
    ``parents`` (:func:`_fitted`)."""
    return _fitted(y, parents, mantissa, ulps, conic)[0]


def _fitted(y: torch.Tensor, parents: list[torch.Tensor], mantissa: int, ulps: float = 0.505,
            conic: bool = False) -> tuple[torch.Tensor, list[float]]:
    """((P,) whether each value of ``y`` is within half a unit in the last place (+1 %) of one weighted sum of its
    ``parents``, the parents' weights): the weights that the most values agree with (:func:`_agreeing`), each
    parent tried as the base of the affine form. Least squares alone is biased here: parents on one grid k units
    apart give a merge whose rounding is a function of k (0.767 A + 0.233 B of two bfloat16 tensors 0.8 degrees
    apart fitted 0.797, and 21 % of the values then missed); one weight at a time can stall on a plane's pair of
    weights from one base (98.8 % of a task-arithmetic merge's values from one base, 99.99 % from another)."""
    half = ulps * torch.ldexp(torch.ones_like(y), torch.frexp(y.abs()).exponent - 1 - mantissa)  # (P,)
    if conic:  # y = sum_i w_i p_i, the weights free (SLERP's sum to a little over 1)
        if len(parents) != 2:
            return _agreeing(y, list(parents), half)
        # two parents a few degrees apart are nearly parallel, and weight by weight the sweep stalls on them
        # (a bfloat16 SLERP 8 degrees apart: 95 % of its values); their mean and difference are nearly orthogonal
        mask, (mean, diff) = _agreeing(y, [(parents[0] + parents[1]) / 2, parents[0] - parents[1]], half)
        return mask, [mean / 2 + diff, mean / 2 - diff]
    fits = []
    for b in range(len(parents) if len(parents) > 2 else 1):
        others = [i for i in range(len(parents)) if i != b]
        mask, w = _agreeing(y - parents[b], [parents[i] - parents[b] for i in others], half)
        weights = [0.0] * len(parents)
        for i, wi in zip(others, w):
            weights[i] = wi
        weights[b] = 1.0 - sum(w)
        fits.append((mask, weights))
    return max(fits, key=lambda f: int(f[0].sum()))


def _agreeing(d: torch.Tensor, dirs: list[torch.Tensor], half: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """((P,) which values of ``d`` lie within ``half`` of ``sum_j w_j dirs[j]``, the weights w): the weights most
    values agree with, from least squares, each weight in turn set by :func:`_stab`, four rounds."""
    x = torch.stack(dirs, 1)  # (P, k - 1)
    w = torch.linalg.lstsq(x, d[:, None]).solution[:, 0]  # (k - 1,)
    for _ in range(4 if x.shape[1] > 1 else 1):
        for j in range(x.shape[1]):
            w[j] = _stab(x[:, j], d - x @ w + x[:, j] * w[j], half)  # what weight j must explain
    return (d - x @ w).abs() <= half, [float(v) for v in w]


def _stab(x: torch.Tensor, d: torch.Tensor, half: torch.Tensor) -> float:
    """The w in the most of the intervals |d_i - w x_i| <= half_i (one a value with x_i != 0): a sweep over
    their sorted ends, an interval's opening before another's closing at one point. Time O(P log P)."""
    return sweep_weight(x.numpy(), d.numpy(), half.numpy())


def sweep_weight(x: np.ndarray, d: np.ndarray, half: np.ndarray, middle: bool = False) -> float:
    """The w in the most of the intervals |d_i - w x_i| <= half_i (one a value with x_i != 0): the end where most
    overlap (:func:`best_overlap`), or the ``middle`` of that overlap; 0 without intervals. O(n log n)."""
    on = x != 0
    a, b = (d[on] - half[on]) / x[on], (d[on] + half[on]) / x[on]
    if not len(a):
        return 0.0
    ends, best = best_overlap(a, b)
    return float((ends[best] + ends[best + 1]) / 2) if middle else float(ends[best])


def best_overlap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """(the sorted ends of the intervals between a_i and b_i, the index of the end where most of them overlap:
    the overlap runs from it to the next end). At a tie of ends the openings come first, so intervals meeting
    at one point overlap there. Time O(n log n)."""
    ends = np.concatenate([np.minimum(a, b), np.maximum(a, b)])  # (2 n,)
    step = np.concatenate([np.ones(len(a)), -np.ones(len(a))])
    order = np.lexsort((-step, ends))  # by end; at a tie the openings (+1) first
    return ends[order], int(np.argmax(np.cumsum(step[order])))


class SampledRows:
    """Models' sampled rows (:func:`read_sampled`) of the layers ``grid`` (:func:`verify_grid`), read once a model
    (all of ``grid``) and kept, least recently used out first over ``budget`` bytes: the weighted-sum check
    (:mod:`.merges`) and the TIES / DARE fit (:mod:`.sparse_merges`) read the same rows of the same candidates
    (over HTTP the fit's second read was 56 requests and 29 MB more on session 36's 8-model zoo). Reads go
    through the models' own ``read_rows`` (``weights``). Memory at most ``budget`` (plus one model); time
    O(sampled values) a model read."""

    BUDGET = 1 << 29  # 512 MiB of float64 values: ~11 7B models' 8 layers of 64 rows (45 MB a model)

    def __init__(self, members: list, grid: list, budget: int = BUDGET):
        self.members, self.grid, self.budget = members, grid, budget
        self.index = {ck.name: i for i, ck in enumerate(members)}
        sizes = [len(sample_rows(t.shape[0])) * int(np.prod(t.shape[1:])) for t in grid]
        self.starts = dict(zip((t.name for t in grid), np.cumsum([0] + sizes).tolist()))
        self.ends = dict(zip((t.name for t in grid), np.cumsum(sizes).tolist()))
        self._kept: OrderedDict[int, np.ndarray | None] = OrderedDict()

    def values(self, i: int) -> np.ndarray | None:
        """(V,) model i's sampled values of every layer of ``grid``, float64; None where a read failed."""
        if i in self._kept:
            self._kept.move_to_end(i)
            return self._kept[i]
        try:
            got = torch.cat([read_sampled(self.members[i], t) for t in self.grid]).numpy() if self.grid else None
        except CheckpointError:
            got = None
        self._kept[i] = got
        while len(self._kept) > 1 and sum(v.nbytes for v in self._kept.values() if v is not None) > self.budget:
            self._kept.popitem(last=False)
        return got

    def __call__(self, ck, t) -> torch.Tensor:
        """:func:`read_sampled` of model ``ck``'s layer ``t`` of ``grid``, from :meth:`values`; CheckpointError
        where its read failed."""
        got = self.values(self.index[ck.name])
        if got is None:
            raise CheckpointError(f"{ck.name}: its sampled rows could not be read")
        return torch.from_numpy(got[self.starts[t.name]:self.ends[t.name]])  # (rows picked x row length,)


class SampledValues:
    """Models' values: :meth:`screen` a few hundred a model (those the pass kept, ``PairStats.samples``: no file
    read again), :meth:`values` the 64 evenly spaced rows a layer of :mod:`.merge_values`, from ``rows`` (read
    once a model and kept, shared with the weighted-sum check: :class:`SampledRows`)."""

    def __init__(self, rows: SampledRows, formats: list[str], samples: np.ndarray):
        self.rows, self.formats, self.samples = rows, formats, samples

    def screen(self, i: int) -> np.ndarray | None:
        """(S,) model i's kept values; None where a read failed (NaN: equal to nothing)."""
        return None if np.isnan(self.samples[i]).all() else self.samples[i]

    def values(self, i: int) -> np.ndarray | None:
        return self.rows.values(i)

    def half(self, i: int) -> np.ndarray:
        """Rounding allowed on :meth:`values`: :data:`ULPS` units in the last place of its format."""
        fmt = self.formats[i] or "float32"
        return ULPS.get(fmt, 0.505) * np.ldexp(1.0, np.frexp(np.abs(self.values(i)))[1] - 1 - MANTISSA[fmt])

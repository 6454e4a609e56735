"""AWQ models whose source is not given, read with AWQ's rescaling undone against their nearest relative.

AWQ (:mod:`.smoothed`) stores ``Q(diag(1 / c_out) W diag(c_in))`` for each projection: the input channels of
the layers a norm feeds are multiplied by ``c`` (0.1-10) and the norm divided by it; ``v_proj``'s and
``up_proj``'s rows are divided by the factors that multiply ``o_proj``'s and ``down_proj``'s inputs. Without
its source among the models, its weights are as far from every relative as another model's, and its kurtosis
is the factors' (a tree of its own on the synthetic zoo, docs/lineage.md). Its relatives give the factors
back, to what the fine-tunes between them moved:

- a norm's: ``c = g_R / g_awq`` for the nearest relative R by :func:`~.smoothed.rescaled_distance` (a
  fine-tune moves norms little);
- the factors between ``v_proj`` and ``o_proj`` (``up_proj`` and ``down_proj``), which no stored tensor holds:
  from the column norms of ``o_proj`` and the row norms of ``v_proj`` against R's,
  ``c_j^2 = (|o[:, j]| / |o_R[:, j]|) (|v_R[j]| / |v[j]|)`` (the geometric mean of the two estimates: the
  rounding's energy, which adds to both norms, cancels to first order). One factor per column fitted to R
  takes only R's difference along that column's own direction away (1 / rows of it), so the view is not
  pulled to R.

:class:`UnsmoothedView` presents ``diag(r) W diag(s)`` for those factors, its rounding variance the error of
rounding R's values of each column on each value's step (:func:`column_errors`: ``step**2 / 12`` is far too
high in a column AWQ scaled down), and the change that rounding makes to the sums of the values' powers its
moment correction (:meth:`UnsmoothedView.rounding_moments`: a value rounded to 0 loses itself; on a layer
whose groups AWQ clipped, :func:`clipped_groups`, the clipped values are taken as R's, :func:`clip_loss`), so
the distance pass compares it as the source it stands in for. Everything that asks about the stored codes
(``grid_match``, ``requantized_match``, ``grid_position``) and every other tensor (norms, embedding, head)
goes to the stored model unchanged, so the copy tests (:mod:`.quantized`, :mod:`.smoothed`) see what they
saw before. A model is read so only when its layers' column norms follow the norms' factors
(:func:`awq_slope` >= :data:`MIN_SLOPE`): a plain quantized model (round-to-nearest, GPTQ) keeps its
distances. Measured (``bench/lineage_awq_standin.py``, docs/benchmarks.md sessions 31, 32): directed edges
0.750 / 0.833 / 0.917 -> 1.000 with a middle / root / leaf model given only as AWQ (factors 0.25-4, 5 seeds);
its kurtosis within 0.05 of its source's on each layer of the test zoo (``bench/lineage_awq_moments.py``;
before: up to 0.40 above).
"""

from __future__ import annotations

import re

import torch

from modelatlas.lineage import smoothed as S
from modelatlas.weights import Checkpoint, TensorInfo

# regression slope of log column-norm ratio on log norm ratio (q_proj against the relative) above which a
# model is taken as AWQ-rescaled: 1 for AWQ (its columns carry the norm's factors), ~0 for a plain rounding
MIN_SLOPE = 0.5
MIN_SPREAD = 1e-3  # standard deviation of log(g_R / g) below which the norms give no factors to regress on
# a group's range is taken as clipped when the relative's values go this many steps beyond its end levels (its
# own rounding: half a step; a fine-tune moves a group's extreme ~0.1 step; AutoAWQ's clipping: ~1-8 steps)
CLIP_STEPS = 1.0
# share of clipped groups above which a layer's moments take in what the clipping took (clip_loss); below it the
# relative beyond an end level is a fine-tune's move, on one side only (llm-compressor's files: none above it)
MAX_CLIPPED = 0.2
STEPS = 24  # steps per column at which column_errors evaluates the error (G / t^2 is smooth in log t)
_LAYER = re.compile(r"^(.*?)(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
# projection -> (the norm whose factors scale its inputs, or None; the pair whose factor scales its rows; the
# pair whose factor scales its inputs)
_ROLE = {"q": ("input_layernorm", None, None), "k": ("input_layernorm", None, None),
         "v": ("input_layernorm", "attn", None), "o": (None, None, "attn"),
         "gate": ("post_attention_layernorm", None, None), "up": ("post_attention_layernorm", "mlp", None),
         "down": (None, None, "mlp")}
_PAIR = {"attn": ("self_attn.v_proj.weight", "self_attn.o_proj.weight", "input_layernorm.weight"),
         "mlp": ("mlp.up_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight")}


class UnsmoothedView(Checkpoint):
    """``ckpt`` (an AWQ model) with each projection read as ``diag(r) W diag(s)``, AWQ's factors estimated
    against ``relative`` (module docstring); its rounding variance scaled by ``r^2 s^2``. Other tensors and all
    questions about the stored codes go to ``ckpt`` unchanged. The factors of a layer are computed on its
    first read and kept (vectors; a v/o or up/down pair reads the four matrices once). Time O(P) a layer."""

    def __init__(self, ckpt: Checkpoint, relative: Checkpoint, rescaled: dict[str, float] | None = None):
        super().__init__(ckpt.path, name=ckpt.name)
        self.inner, self.relative = ckpt, relative
        # model name -> rescaled_distance(ckpt, model), as the relative was chosen by: the copy test's AWQ pass
        # (lineage.quantized) ranks its candidates by the same distances, which read two layers of each again
        self.rescaled = dict(rescaled or {})
        self.format, self.kind, self.name_prefix = ckpt.format, ckpt.kind, ckpt.name_prefix
        self._factors: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._pairs: dict[str, torch.Tensor | None] = {}
        self._moments: dict[str, torch.Tensor] = {}  # layer -> (4,) rounding_moments (4 numbers a layer)

    def _infos(self) -> list[TensorInfo]:
        return self.inner.tensors()

    def _read(self, name: str) -> torch.Tensor:
        self.factors(name)  # first: they read norms and other layers, which drop what the reader keeps of this one
        return self._scaled(name, self.inner.read(name), 1)  # its kept stored tensors serve rounding_variance

    def rounding_variance(self, name: str, values: torch.Tensor | None = None) -> torch.Tensor | None:
        """The stored layer's rounding variance in the view's scaling: for an AWQ projection, what rounding the
        relative's values of each column on that value's step gives (:func:`column_errors`), not ``step**2
        / 12``: the step is set by the group's largest-factor columns, and a column AWQ scaled down holds
        values within a step or two of 0, whose error is far below it. ``values``: the view's (rescaled) ones,
        for the clipping test (read when not given); the inner model's variance reads its own. Keeps the
        layer's :meth:`rounding_moments`. Time O(:data:`STEPS` P)."""
        v = self.inner.rounding_variance(name)
        if v is None or self.factors(name) == (None, None):
            return v
        stored, v = v, self._scaled(name, v, 2)
        if name not in self.relative or self.relative.info(name).shape != tuple(v.shape):
            return v
        rel, step = self.relative.read(name).double(), (12 * v.double()).sqrt()
        x = self.read(name) if values is None else values.reshape(v.shape)  # (out, in) the view's values
        v, moments = column_errors(rel, step)
        if clipped_groups(x, rel, step, stored) > MAX_CLIPPED:  # what clipping took, the relative's tails
            moments = moments + clip_loss(x, rel, step, stored)
        self._moments[name] = moments
        return v.float()

    def rounding_moments(self, name: str) -> torch.Tensor | None:
        """(4,) ``sum E[x^m] - w^m`` of an AWQ projection, by the last :meth:`rounding_variance` of ``name``: in a
        column AWQ scaled down most values round to 0 and lose themselves, which the uniform error independent
        of the value (what lineage assumes without this) does not (the test zoo's AWQ model read kurtosis 1.71
        against its source's 0.16): read off the relative's column values on each value's step
        (:func:`column_errors`), and where the layer's groups were clipped (:func:`clipped_groups` >
        :data:`MAX_CLIPPED`) what the clipping took (:func:`clip_loss`). None where the variance is the stored
        model's. Time O(1)."""
        return self._moments.get(name)

    def _scaled(self, name: str, x: torch.Tensor, power: int) -> torch.Tensor:
        """``x`` (a layer of ``name``'s shape) times its row and column factors to ``power``; as it is for a
        tensor without factors."""
        r, s = self.factors(name)
        if r is None and s is None:
            return x
        y = x.double()
        y = y if r is None else y * r[:, None] ** power  # (out, in) times (out, 1): row i by r_i
        y = y if s is None else y * s ** power  # (out, in) times (in,): column j by s_j
        return y.float()

    def factors(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(row factors r, column factors s) of layer ``name``, float64, None where it has none (not an AWQ
        projection, or the relative lacks what gives them). Time O(P) of the layers read the first time."""
        if name not in self._factors:
            self._factors[name] = self._layer_factors(name)
        return self._factors[name]

    def _layer_factors(self, name: str):
        m = _LAYER.match(name)
        if m is None or self.inner.quantization(name) is None:
            return None, None
        prefix, (norm, rows, cols) = m[1], _ROLE[m[3]]
        s = _norm_factors(self.inner, self.relative, prefix + norm + ".weight") if norm else None
        r = self._pair(prefix, rows) if rows else None
        if cols:
            c = self._pair(prefix, cols)
            s = None if c is None else 1 / c
        return r, s

    def _pair(self, prefix: str, pair: str) -> torch.Tensor | None:
        key = prefix + pair
        if key not in self._pairs:
            self._pairs[key] = pair_factors(self.inner, self.relative, prefix, *_PAIR[pair])
        return self._pairs[key]

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(name)

    def quantization(self, name: str) -> str | None:
        return self.inner.quantization(name)

    def requantized_match(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> float | None:
        return self.inner.requantized_match(name, x, rows=rows)

    def grid_match(self, name: str, x: torch.Tensor, slack: float = 0.0,
                   rows: torch.Tensor | None = None) -> float | None:
        return self.inner.grid_match(name, x, slack, rows=rows)

    def grid_position(self, name: str, x: torch.Tensor, rows: torch.Tensor | None = None) -> float | None:
        return self.inner.grid_position(name, x, rows=rows)

    def stored_tensors(self) -> list[TensorInfo]:
        return self.inner.stored_tensors()

    def close(self) -> None:
        self.inner.close()


def column_errors(w: torch.Tensor, step: torch.Tensor, steps: int | None = None,
                  moments: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What rounding column j of ``w`` (out, in) to the multiples of ``step[i, j]`` does, for each (i, j): (the
    mean squared error ``G_j(t) = mean_k (w_kj - t round(w_kj / t))^2`` at ``t = step[i, j]``, (out, in); the
    summed change of the first four powers, ``sum_ij D_j^m(step[i, j])``, ``D_j^m(t) = mean_k (t round(w_kj /
    t))^m - w_kj^m``, (4,), or None without ``moments``). Each from :data:`STEPS` steps spaced evenly in log
    between the column's smallest and largest, divided by ``t^2`` and interpolated linearly in log t (``G /
    t^2``: ``1 / 12`` for a step small against the column's spread, ``mean w^2 / t^2`` for one beyond its
    values). The column's own values, not row i's: with row i's the model rounded would read as ``w`` wherever
    they round alike. Float64; time O(steps P), three (out, in) scratch tensors reused over the steps."""
    steps = steps or STEPS
    t = step.clamp_min(1e-30).log()  # (out, in)
    lo, hi = t.min(dim=0).values, t.max(dim=0).values  # (in,) each
    width = (hi - lo).clamp_min(1e-12)
    grid = (lo + width * torch.linspace(0, 1, steps, dtype=w.dtype)[:, None]).exp()  # (steps, in)
    powers = torch.stack([w.mean(0), (w * w).mean(0), (w**3).mean(0), (w**4).mean(0)]) if moments else None
    work = [torch.empty_like(w) for _ in range(3)]  # fresh (out, in) tensors each step cost a page fault a page
    table = torch.stack([_rounded(w, grid[a], powers, work) for a in range(steps)])  # (steps, 1 or 5, in)
    pos = ((t - lo) / width * (steps - 1)).clamp(0, steps - 1)  # (out, in): place on the grid
    below = pos.floor().long().clamp(max=steps - 2)
    frac, t2 = pos - below, t.exp() ** 2

    col = table[:, 0]  # (steps, in): G / t^2
    var = (torch.gather(col, 0, below) * (1 - frac) + torch.gather(col, 0, below + 1) * frac) * t2  # (out, in)
    if not moments:
        return var, None
    # the moments are only summed: each grid step's share of the entries' t^2, then one contraction
    weight = torch.zeros(steps, w.shape[1], dtype=w.dtype)  # (steps, in)
    weight.scatter_add_(0, below, (1 - frac) * t2).scatter_add_(0, below + 1, frac * t2)
    return var, torch.einsum("akj,aj->k", table[:, 1:], weight)


def _rounded(w: torch.Tensor, t: torch.Tensor, powers: torch.Tensor | None, work: list[torch.Tensor]) -> torch.Tensor:
    """(5, in): ``G_j(t) / t^2`` and ``D_j^m(t) / t^2`` (m = 1..4; :func:`column_errors`) of each column of ``w``
    (out, in) rounded to the multiples of ``t`` (in,); ``powers`` (4, in) the columns' means of ``w^m`` (None:
    ``G / t^2`` alone, (1, in)). ``work``: three scratch tensors of ``w``'s shape."""
    r, q, x = work
    torch.round(torch.div(w, t, out=r), out=q)  # r = w / t, q its rounding
    g = r.sub_(q).square_().mean(0)
    if powers is None:
        return g[None]
    q2 = torch.mul(q, q, out=x)
    qm = torch.stack([q.mean(0), q2.mean(0), torch.mul(q2, q, out=r).mean(0), q2.square_().mean(0)])  # (4, in)
    tm = t ** torch.arange(1, 5, dtype=w.dtype)[:, None]  # (4, in): t^m
    return torch.cat([g[None], (qm * tm - powers) / t**2])


def clipped_groups(x: torch.Tensor, rel: torch.Tensor, step: torch.Tensor, var: torch.Tensor) -> float:
    """The share of quantization groups whose range was clipped: the relative's values go more than
    :data:`CLIP_STEPS` steps beyond the group's highest or lowest level. ``x`` the model's values, ``rel`` its
    relative's, ``step`` each value's step, ``var`` the stored variance, whose runs of one value along a row are
    the groups (AWQ's: consecutive input columns; two neighbours of one scale read as one); all (out, in).
    AutoAWQ clips every layer's groups but ``q_proj``'s and ``k_proj``'s to the range that quantizes the
    layer's output best: the values beyond it sit on the end levels. Time O(P)."""
    k, r, ids, top, bottom = _group_ends(x, rel, step, var)
    n = len(top)
    high = torch.full((n,), float("-inf"), dtype=r.dtype).scatter_reduce(0, ids, r, "amax")  # (groups,)
    low = torch.full((n,), float("inf"), dtype=r.dtype).scatter_reduce(0, ids, r, "amin")
    over = (high > top + CLIP_STEPS) | (low < bottom - CLIP_STEPS)
    return float(over.double().mean()) if n else 0.0


def clip_loss(x: torch.Tensor, rel: torch.Tensor, step: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(4,) ``sum x^m - rel^m`` (m = 1..4) over the values clipped, as the relative's values tell them: on their
    group's end level, the relative's value more than half a step beyond it (arguments as
    :func:`clipped_groups`). The tails clipping put on the end levels, which no rounding of the relative's
    column values gives back, are taken as the relative's there (those values read as the relative's).
    Time O(P)."""
    k, r, ids, top, bottom = _group_ends(x, rel, step, var)
    hit = ((k == top[ids]) & (r > top[ids] + 0.5)) | ((k == bottom[ids]) & (r < bottom[ids] - 0.5))  # (P,)
    xv, rv = x.reshape(-1)[hit].double(), rel.reshape(-1)[hit].double()  # (H,) each: the values clipped
    return torch.stack([(xv**m - rv**m).sum() for m in range(1, 5)])


def _group_ends(x: torch.Tensor, rel: torch.Tensor, step: torch.Tensor, var: torch.Tensor):
    """(each value's level ``round(x / step)``, the relative's ``rel / step``, its group, (P,) each; the groups'
    highest and lowest levels, (groups,) each) for :func:`clipped_groups`, :func:`clip_loss`. Time O(P)."""
    new = torch.ones(var.shape, dtype=torch.bool)
    new[:, 1:] = var[:, 1:] != var[:, :-1]  # (out, in): a group starts at each row and each change of step
    ids = new.reshape(-1).long().cumsum(0) - 1  # (P,) group of each value
    n = int(ids[-1]) + 1 if len(ids) else 0
    k = torch.round(x.double() / step).reshape(-1)  # (P,)
    top = torch.full((n,), float("-inf"), dtype=k.dtype).scatter_reduce(0, ids, k, "amax")  # (groups,)
    bottom = torch.full((n,), float("inf"), dtype=k.dtype).scatter_reduce(0, ids, k, "amin")
    return k, (rel.double() / step).reshape(-1), ids, top, bottom


def stored(ck: Checkpoint) -> Checkpoint:
    """The model as stored: the inner model of an :class:`UnsmoothedView`, else ``ck``."""
    return ck.inner if isinstance(ck, UnsmoothedView) else ck


def _norm_factors(awq: Checkpoint, relative: Checkpoint, norm: str) -> torch.Tensor | None:
    """``g_awq / g_R`` (float64): what undoes the norm's factors on the inputs; None when R lacks the norm in
    that shape or a ratio is no positive finite number. Time O(hidden size)."""
    got = S.channel_factors(awq, relative, norm)
    return None if got is None else 1 / got[0]


def pair_factors(awq: Checkpoint, relative: Checkpoint, prefix: str, feeding: str, fed: str,
                 norm: str) -> torch.Tensor | None:
    """The factors AWQ multiplied ``fed``'s inputs (``o_proj``) and divided ``feeding``'s rows (``v_proj``) by,
    from norms against ``relative``: ``c_j^2 = (|fed[:, j]| / |fed_R[:, j]|) (|feeding_R[j]| / |feeding[j]|)``,
    ``feeding``'s inputs first freed of ``norm``'s factors (float64); the one estimate that is a positive finite
    number where the other is not (factors of 0.1: a column of ``fed`` stored as all zeros), 1 where neither
    is. None when the pair is not both quantized,
    the shapes differ from R's or ``feeding``'s rows are not ``fed``'s inputs (grouped-query attention: AWQ
    leaves that pair alone). Time O(P) of the four matrices."""
    a, b, n = prefix + feeding, prefix + fed, prefix + norm
    if not all(x in awq and x in relative for x in (a, b, n)) or awq.quantization(a) is None \
            or awq.quantization(b) is None:
        return None
    if awq.info(a).shape != relative.info(a).shape or awq.info(b).shape != relative.info(b).shape \
            or awq.info(a).shape[0] != awq.info(b).shape[1]:
        return None
    s = _norm_factors(awq, relative, n)
    if s is None or len(s) != awq.info(a).shape[1]:
        return None
    from_rows = relative.read(a).double().norm(dim=1) / (awq.read(a).double() * s).norm(dim=1)  # (out,)
    from_cols = awq.read(b).double().norm(dim=0) / relative.read(b).double().norm(dim=0)  # (in,)
    both = (from_rows * from_cols).sqrt()
    return torch.where(_usable(both), both, torch.where(_usable(from_rows), from_rows,
                                                        torch.where(_usable(from_cols), from_cols, 1.0)))


def _usable(c: torch.Tensor) -> torch.Tensor:
    """Which factors are positive finite numbers (a row or column stored as all zeros gives 0 or inf)."""
    return torch.isfinite(c) & (c > 0)


def awq_slope(awq: Checkpoint, relative: Checkpoint) -> float:
    """Least-squares slope of ``log(|W[:, j]| / |W_R[:, j]|)`` on ``log(g_R / g_awq)_j`` over the first norm-fed
    layer (``q_proj``): ~1 when the model's columns carry the factors its norm was divided by (AWQ), ~0 when
    the norms differ by what a fine-tune moved (a plain quantized model); 0.0 when the norms barely differ
    (:data:`MIN_SPREAD`) or R lacks the layer; columns stored as all zeros are left out. Time O(P) of the
    layer."""
    pairs = S.smoothed_pairs(awq)
    if not pairs:
        return 0.0
    norm, (name, *_) = pairs[0]
    got = S.channel_factors(awq, relative, norm)
    if got is None or name not in relative or relative.info(name).shape != awq.info(name).shape:
        return 0.0
    x = got[0].log()
    if float(x.std()) < MIN_SPREAD:
        return 0.0
    y = (awq.read(name).double().norm(dim=0) / relative.read(name).double().norm(dim=0).clamp_min(1e-30)).log()
    kept = torch.isfinite(y)  # a column AWQ scaled down to below half a step everywhere reads 0: left out
    x, y = x[kept] - x[kept].mean(), y[kept] - y[kept].mean()
    return float((x * y).sum() / (x * x).sum().clamp_min(1e-30))


def unsmoothed(members: list[Checkpoint], layers: list[TensorInfo]) -> tuple[list[Checkpoint], dict[str, str]]:
    """``members`` with each AWQ model (:func:`~.smoothed.smoothed_pairs`, :func:`awq_slope` >=
    :data:`MIN_SLOPE` against its relative) as an :class:`UnsmoothedView` against its relative: the model
    stored without quantized ``layers`` nearest it by :func:`~.smoothed.rescaled_distance`. Returns (members,
    {AWQ model: relative}). Time O(A N P_2) for A AWQ models (two layers of each model read per AWQ model)."""
    plain = [c for c in members if not any(c.quantization(t.name) for t in layers)]
    out, relatives = [], {}
    for ck in members:
        rel, dist = _relative(ck, plain) if plain and S.smoothed_pairs(ck) else (None, {})
        if rel is not None and awq_slope(ck, rel) >= MIN_SLOPE:
            ck, relatives[ck.name] = UnsmoothedView(ck, rel, dist), rel.name
        out.append(ck)
    return out, relatives


def _relative(ck: Checkpoint, plain: list[Checkpoint]) -> tuple[Checkpoint | None, dict[str, float]]:
    """(the model of ``plain`` nearest ``ck`` by :func:`~.smoothed.rescaled_distance`, None when none is
    comparable (infinite); each model's distance by name). Time O(N P_2)."""
    dist = {r.name: S.rescaled_distance(ck, r) for r in plain}
    best = min(plain, key=lambda r: dist[r.name])
    return (best if dist[best.name] < float("inf") else None), dist

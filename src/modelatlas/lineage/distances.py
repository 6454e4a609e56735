"""Pairwise weight distances and per-model kurtosis in one streaming pass over the layers.

**Reading.** The pass is layer-major: for each selected layer name, that tensor is read from every model
(``Checkpoint.read``), so every tensor of every checkpoint is read exactly once and every file is opened
once (safetensors readers keep one memory map per file; only the bytes of the selected layers are
touched). Small layers (compared exactly, P_l <= 4k) are stacked into an (N, P_l) block; large (sketched)
layers are reduced one model at a time (:func:`_stream_layer`): kurtosis power sums, the k-bucket sketch
and the rank sketch of that model, then the weights are dropped. Peak memory: O(N min(P_l, 4k) + P_l +
N k + N s^2) floats per layer plus O(N^2) accumulators -- never the layer of all models when it is large.

**Full fine-tuning distance.** ``||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b``: all pairwise distances of a
layer come from one Gram matrix ``X X^T`` of the (N, P_l) stacked weights -- no loop over pairs. The rows
are centred on the layer's mean first (distances are translation invariant), so the Gram entries are of
the size of the *differences* and float64 keeps them exact even for tiny fine-tuning steps.

**LoRA distance.** A random sketch ``W Omega`` (Omega: seeded Gaussian, m x s) is kept per model and layer;
since the sketch is linear, ``(W_u - W_v) Omega = W_u Omega - W_v Omega`` and rank(W_u - W_v) is estimated
from the singular values of an (n, s) matrix instead of an SVD of the full (n, m) difference
(:func:`modelatlas.lineage.spectra.spectral_distances`). Layers with n > 2s rows are also sketched on the left, ``Psi^T W Omega``
(Psi: n x 2s), so a pair costs O(s^3) whatever the width; the rank of a difference of rank < s is kept, its
singular values approximately. Psi is a count sketch (each row, with a random sign, added to one of 2s
buckets), applied first, so a model's sketch costs O(n m + s^2 m) instead of the O(n m s) of a dense
Gaussian projection (``rank_sketch="gaussian"``, kept as an option; on 36 synthetic forests and three trained
wide zoos both kinds recovered the same edges).

**Sketched full fine-tuning distance (large layers).** The exact Gram is O(N^2 P_l) per layer against O(N P_l)
for reading it, so for layers of more than ``4 k`` weights (``gram_sketch=k``, default 4096) each model's
layer is first reduced to ``k`` numbers by a seeded sign-bucket sketch (count-sketch with balanced buckets:
entry j gets a random sign and is added to bucket ``j mod k``), O(N P_l), and the Gram is taken of the
sketches, O(N^2 k). The sketch is linear and ``E ||S d||^2 = ||d||^2`` (unbiased); the relative standard
deviation of one squared distance is at most sqrt(2 / k) (2% for k = 4096) when the difference is spread over
many weights, less after averaging over layers. ``gram_sketch=None`` keeps the exact Gram for every layer.

Time O(L N P) reading + kurtosis + O(L N^2 min(P, k)) for the Grams (L layers of P weights; exact: O(L N^2 P)
when P <= 4k), O(N P + N s^2 m) for the rank sketches (m: columns); memory O(N min(P_l, 4k) + P_l + N k + N^2 +
N L s^2). Temporaries (powers, signed copies, batched spectra) live in reused workspaces: a fresh large tensor
per step costs a page fault per 4 KiB page, which measured as much as the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from modelatlas.errors import AtlasError, shown_path
from modelatlas.lineage import rounding as _rounding
from modelatlas.lineage.merges import LAYER_SQ_CAP
from modelatlas.lineage.rounding import LayerNoise, LayerRounding, debiased_moments, debiased_squared
from modelatlas.lineage.spectra import RankSketch
from modelatlas.lineage.value_formats import ValueFormats, ValueSamples
from modelatlas.progress import Progress, resolve
from modelatlas.seeding import derive_seed, torch_generator
from modelatlas.weights import Checkpoint, TensorInfo

_CHUNK = 1 << 20  # columns per Gram block: bounds the float64 copy to N x 8 MiB
_AHEAD = 2  # models whose next layer is prefetched (posix_fadvise WILLNEED) while one is reduced
GRAM_SKETCH = 4096  # default sketch size of the full-FT distances; layers of <= 4x this many weights stay exact




@dataclass
class PairStats:
    """What one pass over a group of same-architecture models yields (N models, L layers)."""

    rms: np.ndarray  # (N, N) mean over layers of RMS(W_u - W_v) = ||dW||_F / sqrt(P)  (MoTHer's D)
    rel: np.ndarray  # (N, N) mean over layers of ||dW||_F / sqrt((||W_u||^2 + ||W_v||^2) / 2)
    kurtosis: np.ndarray  # (N,) sum over layers of the Fisher (excess) kurtosis
    l1: np.ndarray | None = None  # (N, N) mean over layers of mean|dW| (the paper's clustering distance)
    sketches: list[np.ndarray] = field(default_factory=list)  # per 2-D layer: (N, min(n, 2s), s)
    layer_kurtosis: np.ndarray | None = None  # (N, L) kurtosis of each layer (the sum is ``kurtosis``)
    failed: dict[int, str] = field(default_factory=dict)  # model index -> why a read failed
    value_formats: list[str] = field(default_factory=list)  # per model: "bfloat16" / "float16" its values fit, or ""
    rounding: list[LayerRounding] = field(default_factory=list)  # per sketched layer: each model's rounding
    # (N, N) ``rel`` of the values as read, a quantized model's rounding left in: ``rel`` less it reads 0 for a
    # stand-in and a model nearer it than its rounding, which no duplicate test may take for identical
    stored_rel: np.ndarray | None = None
    # sums over layers of ||W_u - W_v||^2 less both models' rounding energy (as read: ~0 for two roundings of one
    # model) and of that sum's variance when so (:func:`~modelatlas.lineage.rounding.same_model_pairs`)
    excess: np.ndarray | None = None
    spread: np.ndarray | None = None
    norms2: np.ndarray | None = None  # (N,) sum over layers of ||W||^2 (a merge's rounding scale: lineage.merges)
    layer_sq: list[np.ndarray] | None = None  # per layer (N, N) float32 ||dW||^2 (lineage.merges); None: see LAYER_SQ_CAP
    samples: np.ndarray | None = None  # (N, S) a few values of each model, the same positions (ValueSamples)


def stream_pair_stats(ckpts: list[Checkpoint], layers: list[TensorInfo], *, sketch: int | None = None,
                      l1: bool = False, seed: int = 0, progress: Progress | None = None,
                      gram_sketch: int | None = GRAM_SKETCH, stream: bool = True,
                      rank_sketch: str = "count", layer_sq: bool = True) -> PairStats:
    """One pass: Gram-matrix distances, kurtosis, optional rank sketches (``sketch`` columns) and optional
    pairwise mean|dW| (``l1``, O(N^2 P) via ``torch.cdist``). ``gram_sketch``: sketch size of the distances of
    layers with more than 4x as many weights (None: exact everywhere). ``stream``: sketched layers are reduced one
    model at a time (O(P_l + N k) memory, no (N, P_l) block); False stacks every layer (the reference path; ``l1``
    always stacks). ``rank_sketch``: ``"count"`` or ``"gaussian"`` left (row) sketch of layers with more than 2 s
    rows (:class:`RankSketch`). ``layer_sq``: keep each layer's squared distances (per-layer merges)."""
    n = len(ckpts)
    st = PairStats(np.zeros((n, n)), np.zeros((n, n)), np.zeros(n), np.zeros((n, n)) if l1 else None,
                   stored_rel=np.zeros((n, n)), excess=np.zeros((n, n)), spread=np.zeros((n, n)), norms2=np.zeros(n),
                   layer_sq=[] if layer_sq and n * n * len(layers) <= LAYER_SQ_CAP else None)
    fits = ValueFormats(n, samples=ValueSamples(n, layers))
    bar = resolve(progress)(layers, total=len(layers), desc="reading layers")
    per_layer = []
    for info in bar:
        before = st.kurtosis.copy()
        sk_k = gram_sketch if gram_sketch and info.numel > 4 * gram_sketch else None
        rank = RankSketch(info, sketch, seed, rank_sketch) if sketch and len(info.shape) >= 2 else None
        gseed, kinds = derive_seed(seed, "gram", info.name), _rounding.layer_kinds(ckpts, info)
        if sk_k is not None and stream and not l1:
            mom, gram, shift, y, noise = _stream_layer(ckpts, info, st.failed, sk_k, gseed, rank, fits)
            _add_layer(st, mom, gram, shift, info.numel, LayerNoise(noise, kinds, sk_k))
        else:
            x = _read_layer(ckpts, info, st.failed, fits)  # (N, P) float32
            noise = _accumulate(st, x, l1, sk_k, gseed, kinds,
                                lambda c, x=x, info=info: _rounding.layer_rounding_sums(ckpts, info, x, c, st.failed))
            y = None if rank is None else rank(x)
        per_layer.append(st.kurtosis - before)
        if y is not None:
            st.sketches.append(y.numpy())  # (N, min(n, 2s), s)
            st.rounding.append(LayerRounding(noise[:, 0].numpy(), kinds, info.numel))
    st.layer_kurtosis = np.stack(per_layer, 1) if per_layer else np.zeros((n, 0))  # (N, L)
    st.value_formats, st.samples = fits.formats(), fits.samples.values
    for m in (st.rms, st.rel, st.stored_rel, st.l1):  # sums over layers -> means
        if m is not None:
            m /= max(len(layers), 1)
    return st


def _stream_layer(ckpts: list[Checkpoint], info: TensorInfo, failed: dict[int, str], k: int, seed: int,
                  rank: RankSketch | None, fits: ValueFormats | None = None):
    """Power sums (N, 4), sketched Gram (N, N), kurtosis shift and rank sketches of one large layer, one
    model at a time: each model's weights are read, reduced to O(k + s^2) numbers and dropped. A failed
    read leaves a zero row (the model is dropped later). Time O(N P + N^2 k) (+ O(N P s) rank sketches),
    memory O(P + N k + N s^2): no (N, P) block and no copy of float32 weights."""
    n = len(ckpts)
    signs = _signs(info.numel, seed)  # (P,) shared by all models: the sketch stays linear
    mom = torch.zeros(n, 4, dtype=torch.float64)
    sk = torch.zeros(n, k, dtype=torch.float64)
    y = None
    shift = None
    noise = torch.zeros(n, _rounding.SUMS, dtype=torch.float64)
    pw = torch.empty(3, 1, info.numel, dtype=torch.float32)  # workspaces reused by every model
    bw = torch.zeros(1, info.numel + (-info.numel) % k, dtype=torch.float32)
    work = _rounding.RoundingWork(info.numel)
    for i, x in _rows(ckpts, info, failed, fits):  # x: (1, P) float32
        if shift is None:  # the first readable model's mean: any value near the entries conditions the powers
            shift = float(x.mean())
        mom[i] = _power_sums(x, shift, pw)[0]
        sk[i] = _bucket_sums(x, signs, k, bw)[0]
        if (r := _rounding.rounding_sums(ckpts[i], info.name, x, shift, work)) is not None:  # patchable in tests
            noise[i] = r
        if rank is not None:
            yi = rank(x)[0]  # (n', s)
            y = torch.zeros(n, *yi.shape, dtype=yi.dtype) if y is None else y
            y[i] = yi
    if y is None and rank is not None:  # nothing readable
        y = rank(torch.zeros(1, info.numel)).expand(n, -1, -1).clone()
    c = sk - sk.mean(0)  # centring is exact on the sketch (it is linear)
    return mom, c @ c.T, 0.0 if shift is None else shift, y, noise


def _rows(ckpts: list[Checkpoint], info: TensorInfo, failed: dict[int, str], fits: ValueFormats | None = None):
    """Yield (i, layer ``info`` of model i as a (1, P) float32 row) for every readable model, in order. The
    layer of the models _AHEAD further is prefetched (:func:`_prefetch`: a kernel readahead hint, no thread;
    reading ahead in a Python thread was measured in an earlier version: no gain on 2 shared cores)."""
    for i in range(len(ckpts)):
        _prefetch(ckpts, info, i)
        x, stored = (None, None) if i in failed else _read_one(ckpts[i], info, failed, i)
        if x is not None:
            if fits is not None:
                fits.update(i, x, stored)
                if fits.samples is not None:
                    fits.samples.update(i, info, x)
            yield i, x


def _prefetch(ckpts: list[Checkpoint], info: TensorInfo, i: int) -> None:
    """Before model i is read, hint that model i + _AHEAD's layer follows (models 0.._AHEAD at i = 0), so
    the kernel reads it from storage while model i is reduced: a cold read overlaps the compute."""
    for j in range(_AHEAD + 1) if i == 0 else (i + _AHEAD,):
        if j < len(ckpts):
            ckpts[j].prefetch(info.name)


def _read_one(ck: Checkpoint, info: TensorInfo, failed: dict[int, str],
              i: int) -> tuple[torch.Tensor | None, torch.dtype | None]:
    """Layer ``info`` of one model as a (1, P) float32 row (no copy when it is stored as float32) and the
    dtype it was read in, or (None, None) with the reason in ``failed``."""
    try:
        t = ck.read(info.name)
        if tuple(t.shape) != info.shape:
            raise AtlasError(f"{shown_path(ck.path)}: tensor {info.name!r} has shape {tuple(t.shape)}, "
                             f"header says {info.shape}")
        row = t.detach().reshape(1, -1).to(torch.float32)
        # one NaN / inf would poison the layer mean, hence every distance of the group: skip the model instead
        # (the sum is one cheap pass; the full check runs only when it is not finite)
        if not torch.isfinite(row.sum()) and not torch.isfinite(row).all():
            raise AtlasError(f"{shown_path(ck.path)}: tensor {info.name!r} holds NaN or inf values (a diverged or "
                             "corrupt checkpoint); fix or remove it")
        return row, t.dtype
    except (AtlasError, OSError, RuntimeError) as e:
        failed[i] = str(e)
        return None, None


def _read_layer(ckpts: list[Checkpoint], info: TensorInfo, failed: dict[int, str],
                fits: ValueFormats | None = None) -> torch.Tensor:
    """Layer ``info`` of every model as rows of an (N, P) float32 matrix; a failed read leaves zeros."""
    x = torch.zeros(len(ckpts), info.numel, dtype=torch.float32)
    for i, row in _rows(ckpts, info, failed, fits):
        x[i] = row[0]
    return x


def _signs(p: int, seed: int) -> torch.Tensor:
    """(P,) seeded random +-1 (float32) of the sign-bucket sketch."""
    gen = torch_generator(seed)
    return torch.randint(0, 2, (p,), generator=gen, dtype=torch.int8).to(torch.float32) * 2 - 1


def sign_bucket_sketch(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """(N, k) linear sketch of the rows of ``x`` (N, P): entry j times a seeded random sign, added to bucket
    ``j mod k``; every row gets the same signs, so sketch(a) - sketch(b) = sketch(a - b) and
    E ||sketch(d)||^2 = ||d||^2. Time O(N P), memory O(N P) (one float32 copy)."""
    return _bucket_sums(x, _signs(x.shape[1], seed).to(x.dtype), k)


def _bucket_sums(x: torch.Tensor, signs: torch.Tensor, k: int, work: torch.Tensor | None = None) -> torch.Tensor:
    """(N, k) float64 sums of ``x * signs`` per bucket ``j mod k``, in blocks of ~1M entries written into a
    zero-padded workspace (``work``: (R, P + pad), reused when given). Time O(N P)."""
    n, p = x.shape
    pad = (-p) % k
    rows = max(1, (1 << 20) // p)  # blocks of ~1M entries: the signed copy stays in cache
    if work is None or work.shape[0] < min(rows, n) or work.shape[1] != p + pad:
        work = torch.zeros(min(rows, n), p + pad, dtype=x.dtype)  # (R, P + pad); the pad stays 0
    out = torch.empty(n, k, dtype=torch.float64)
    for r in range(0, n, rows):
        xr = x[r:r + rows]  # (R, P)
        y = work[:len(xr)]
        torch.mul(xr, signs, out=y[:, :p])
        out[r:r + rows] = y.view(len(y), -1, k).sum(1).double()  # (R, P / k, k) -> (R, k); float32 cascade sums
    return out


def _gram(x: torch.Tensor, mean: torch.Tensor, k: int | None, seed: int) -> torch.Tensor:
    """(N, N) float64 Gram of the rows of ``x`` centred on ``mean``: exact (O(N^2 P)) or of their
    ``k``-bucket sketches (O(N P + N^2 k))."""
    if k is None:
        p = x.shape[1]
        gram = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
        for a in range(0, p, _CHUNK):
            c = x[:, a:a + _CHUNK].double() - mean[a:a + _CHUNK]  # (N, B) centred: Gram entries stay small
            gram += c @ c.T
        return gram
    y = sign_bucket_sketch(x, k, seed)  # (N, k) float64
    c = y - y.mean(0)  # centring is exact on the sketch (it is linear)
    return c @ c.T


def _accumulate(st: PairStats, x: torch.Tensor, l1: bool, k: int | None = None, seed: int = 0,
                kinds: np.ndarray | None = None, rounding=None) -> torch.Tensor:
    """Add one layer's distances and kurtosis; returns the (N, SUMS) rounding sums ``rounding(shift)`` gave
    (zeros without it). Time O(N^2 P) exact or O(N P + N^2 k) with a ``k`` sketch; extra memory
    O(N * _CHUNK)."""
    n, p = x.shape
    ok = torch.ones(n, dtype=torch.bool)
    ok[list(st.failed)] = False
    exact = k is None
    mean = x[ok].double().mean(0) if ok.any() and exact else torch.zeros(p if exact else 1, dtype=torch.float64)
    mom = torch.zeros(n, 4, dtype=torch.float64)  # per model: sums of e, e^2, e^3, e^4 (e = x - a scalar shift)
    # a scalar shift (any value near the entries keeps the powers well conditioned): kurtosis is about each
    # model's own entries, not across models
    first = int(ok.nonzero()[0]) if ok.any() else 0
    shift = float(mean.mean()) if exact else float(x[first].mean())
    for a in range(0, p, _CHUNK):
        # powers and row sums in float32 (relative error ~1e-7 per entry, cascade summation), accumulated in
        # float64 across chunks: no float64 copy of the layer; the kurtosis agrees with float64 to ~1e-6
        mom += _power_sums(x[:, a:a + _CHUNK], shift)
        if l1:
            xa = x[:, a:a + _CHUNK].double()  # (N, B)
            st.l1 += (torch.cdist(xa, xa, p=1) / p).numpy()
    noise = rounding(shift) if rounding is not None else torch.zeros(n, _rounding.SUMS, dtype=torch.float64)
    kinds = np.full(n, None, dtype=object) if kinds is None else kinds
    _add_layer(st, mom, _gram(x, mean, k, seed), shift, p, LayerNoise(noise, kinds, k))
    return noise


def _add_layer(st: PairStats, mom: torch.Tensor, gram: torch.Tensor, shift: float, p: int,
               rounding: LayerNoise | None = None) -> None:
    """Add one layer's RMS / relative distances (from its (N, N) centred Gram) and kurtosis (from the (N, 4)
    power sums of the entries shifted by ``shift``), a quantized model's rounding error taken out of both
    (``rounding.sums``: (N, SUMS) :func:`~modelatlas.lineage.rounding.rounding_sums`, zeros for the others; its
    ``k``: the Gram's sketch size, whose error ~ sqrt(2 / k) of a squared distance widens the same-model test).
    Time O(N^2)."""
    noise = None if rounding is None else rounding.sums
    if noise is not None:
        mom = debiased_moments(mom, noise)
    # sum of x^2 (uncentred squared norm) from the shifted sums: sum (e + c)^2 = S2 + 2 c S1 + P c^2
    raw = mom[:, 1] + 2 * shift * mom[:, 0] + p * shift**2
    sq = torch.diagonal(gram)
    d2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)  # (N, N) ||W_u - W_v||^2
    scale = ((raw[:, None] + raw[None, :]) / 2).clamp_min(1e-30)
    if noise is not None and bool((noise[:, 0] > 0).any()):
        stored = scale + (noise[:, :1] + noise[None, :, 0]) / 2  # the norms as read: the rounding left in
        st.stored_rel += (d2 / stored).sqrt().numpy()
        layer = LayerRounding(noise[:, 0].numpy(), rounding.kinds, p)
        if st.excess is not None:
            excess, spread = _rounding.rounding_excess(d2, noise, layer.same_kind())
            st.excess += excess.numpy()
            st.spread += (spread + (2 * d2**2 / rounding.k if rounding.k else 0)).numpy()
        d2 = debiased_squared(d2, noise[:, 0], layer)
        st.layer_sq = None
    else:
        st.stored_rel += (d2 / scale).sqrt().numpy()
        if st.excess is not None:
            st.excess += d2.numpy()
        if st.layer_sq is not None:
            st.layer_sq.append(d2.numpy().astype(np.float32))
    st.rms += (d2 / p).sqrt().numpy()
    st.rel += (d2 / scale).sqrt().numpy()
    if st.norms2 is not None:
        st.norms2 += raw.numpy()
    st.kurtosis += _kurtosis_from_moments(mom, p).numpy()


def _power_sums(x: torch.Tensor, shift: float, work: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 4) float64 sums of e, e^2, e^3, e^4 per row (e = x - shift), in blocks of rows of ~1M entries so
    the float32 powers stay in cache. e and e^2 are written into a (3, R, B) workspace (``work``, reused
    across calls when given: a fresh page costs a page fault each, ~8x slower on a 1 MB row) and each sum is
    taken as soon as its power is written, e^3 and e^4 in turn in the third plane: the same float32 cascade
    sums as four written powers, bit for bit, with three passes over memory fewer (1.5 -> 0.9-1.1 ms a
    1M-entry row, session 40). Time O(N B), memory O(min(N B, 3M))."""
    n, b = x.shape
    rows = max(1, (1 << 20) // max(b, 1))
    if work is None or work.shape[0] < 3 or work.shape[1] < min(rows, n) or work.shape[2] != b:
        work = torch.empty(3, min(rows, n), b, dtype=torch.float32)  # (3, R, B)
    out = torch.empty(n, 4, dtype=torch.float64)
    for r in range(0, n, rows):
        xr = x[r:r + rows]  # (R, B)
        e, e2, ek = work[:3, :len(xr)].unbind(0)  # each (R, B)
        torch.sub(xr, shift, out=e)
        torch.mul(e, e, out=e2)
        s1, s2 = e.sum(1), e2.sum(1)  # float32 cascade sums
        s3 = torch.mul(e2, e, out=ek).sum(1)
        s4 = torch.mul(e2, e2, out=ek).sum(1)  # e^4 over e^3: its sum is taken
        out[r:r + rows] = torch.stack([s1, s2, s3, s4], 1).double()  # (R, 4)
    return out


_FLAT = 1e-3  # a row whose variance is under this share of its shifted second moment has no measurable kurtosis


def _kurtosis_from_moments(mom: torch.Tensor, p: int) -> torch.Tensor:
    """Fisher (excess) kurtosis of each row from sums of powers of its shifted entries; 0 (a Gaussian's) for
    a row that is constant to float32 precision (an all-zero layer, e.g. a zero-initialised gate or
    ControlNet's zero convolutions): its fourth central moment is then rounding noise in terms of size m1^4,
    and dividing it by a variance of ~0 gave kurtosis of 1e282 that swamped every other layer's. Rows
    whose spread is under ~3% of their offset from the shift fall under the same rule: float32 sums leave
    their kurtosis as noise too. Time O(N)."""
    m1, m2, m3, m4 = (mom / p).unbind(1)  # raw moments of the shifted entries; the row's own mean is m1
    centred = m2 - m1**2
    var = centred.clamp_min(1e-150)  # var**2 stays a normal float64 (a failed, all-zero row: no 0/0)
    c4 = m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4  # fourth central moment of the row
    flat = centred <= _FLAT * m2  # (N,) also a row of zeros shifted by 0 (0 <= 0)
    return torch.where(flat, torch.zeros_like(c4), c4 / var**2 - 3.0)

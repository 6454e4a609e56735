"""Quantized models in lineage: the rounding error their dequantized weights carry, taken out of distances,
moments and spectra.

A quantized model's dequantized weights are its source's plus a rounding error ``u`` (uniform over one step
of the levels around each value; :meth:`~modelatlas.weights.Checkpoint.rounding_variance` gives its variance
``v`` per value). For 4-bit types ``u`` is ~8 % of the weights' RMS, the size of a fine-tune, and it is
independent of everything else, so it adds to every distance of the model: ``E ||W_q - W||^2 = ||W_src -
W||^2 + sum v``. With the sum left in, a quantized copy that stands in for its absent model sat farther from
all of its relatives than they are from each other: in the MST it became a leaf, its children hung from its
parent ("grandparent" errors), and its kurtosis (lowered by the uniform noise) flipped edges (62 % directed
over 10 held-out zoos with a third of the models only as Q4_0 files, 96 % without quantization; docs/
benchmarks.md, session 30). Since ``u`` is independent of the weights and of zero mean, the expected
contribution of each statistic is known and is subtracted:

- squared distances: ``sum v`` of each quantized model of the pair (:func:`debiased_squared`); for two models
  rounded to one type, one grid, what that grid adds to their difference (:func:`same_grid_noise`);
- power sums of ``e = x - c``: ``E (e + u)^2 = e^2 + v``, ``E (e + u)^3 = e^3 + 3 e v``,
  ``E (e + u)^4 = e^4 + 6 e^2 v + 1.8 v^2`` (a uniform error's fourth moment is ``step^4 / 80 = 1.8 v^2``)
  (:func:`rounding_sums`, :func:`debiased_moments`); where the error depends on the value (an AWQ model read
  against a relative, :mod:`.unsmoothed`: a value rounded to 0 has itself as its error) the checkpoint's own
  :meth:`~modelatlas.weights.Checkpoint.rounding_moments`, shifted to ``e``, replace those corrections (the
  distances keep ``sum v``);
- the singular values of sketched differences, for the nuclear norm: the noise adds a Marchenko-Pastur
  bulk, removed by the spiked-model inverse ``x^2 = ((y^2 - 1 - b) + sqrt((y^2 - 1 - b)^2 - 4 b)) / 2`` of
  each value ``y`` above the bulk's edge ``1 + sqrt(b)`` (in units of the noise; ``b`` the sketch's aspect
  ratio; Gavish & Donoho 2017, "Optimal shrinkage of singular values"), and 0 below it
  (:func:`debiased_singular_values`). The rank is counted before (see
  :func:`~modelatlas.lineage.spectra.spectral_distances`).

Measured (``bench/lineage_quantized.py --replace``, 10 held-out zoos, 360 edges, a third of the models only
as quantized files): Q4_0 224 -> 288 edges right, Q5_1 231 -> 301, Q8_0 339 -> 344; without quantization 345;
12 more held-out zoos with LoRA trees, Q4_0: 271 -> 364 of 432 (docs/benchmarks.md, session 30). Duplicate tests compare the values as read (``PairStats.stored_rel``):
with the rounding taken out, a stand-in and a model nearer it than its rounding read 0 apart. Two roundings
of one model not given are found by what is left (:func:`same_model_pairs`).

A model made from a quantized model's dequantized values (a QLoRA merge) shares its rounding error, which
the subtraction then wrongly removes from their pair (it reads nearer its base than it is), and keeps it
against every other model (it reads farther from them than its update says, like an unrecognised stand-in).
Without its base given, a merge is recognised from its values and gets its NF4 rounding variance
(:mod:`modelatlas.lineage.qlora`; type :data:`MERGE_KIND`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from modelatlas.errors import AtlasError
from modelatlas.weights import Checkpoint, TensorInfo
from modelatlas.weights.gguf_grid import GRIDS

UNIFORM_M4 = 1.8  # E u^4 / (E u^2)^2 of a uniform error: (step^4 / 80) / (step^2 / 12)^2
SAME_MODEL_Z = 4.0  # standard deviations of the rounding's own spread within which two roundings are one model
# plus this share of their summed rounding energy: the variance read off the scales is the real error's to
# within a few % (0.97-1.03 for GGUF's legacy types on one layer), and that error adds up over layers where the
# spread does not (two roundings of one model read -2 % .. +5.4 % of it over 10 zoos, Q4_0 / Q5_1 / Q8_0)
SAME_MODEL_REL = 0.04
MERGE_KIND = "NF4-MERGE"  # lineage.qlora's merged QLoRA models (defined here: qlora imports this module's users)


def least_squares_scales(kind: str) -> bool:
    """Whether a model stored as ``kind`` (:func:`~modelatlas.lineage.quantized.quant_type`'s "q4_k+q6_k") has
    K-quant layers, whose scales llama.cpp fits by least squares: the error is not independent of the values
    (each block's largest value shrinks by 0.15-0.3 of a step), so the moment correction here leaves its
    kurtosis 0.05-0.6 a layer under its source's (docs/benchmarks.md, "Session 32: orientation of K-quant
    stand-ins"). Round-to-nearest types (gguf-py's, llama.cpp's legacy types without an importance matrix)
    keep the uniform model. Time O(1)."""
    return any(k.upper() in GRIDS for k in kind.split("+"))  # the K-quants (evenly spaced levels per sub-block)


def least_squares_models(kinds: dict[str, str], fitted: frozenset[str] = frozenset()) -> frozenset[str]:
    """The models of ``kinds`` (name -> :func:`~modelatlas.lineage.quantized.quant_type`) with K-quant layers
    (:func:`least_squares_scales`) or among ``fitted``: legacy types whose blocks read as least-squares fits
    (:func:`~modelatlas.lineage.quantized.least_squares_fitted`; llama-quantize's with an importance matrix,
    which the type does not tell). Time O(N)."""
    return frozenset(n for n, k in kinds.items() if least_squares_scales(k) or n in fitted)


SUMS = 8  # columns of rounding_sums: four for the distances' noise, four for the moments' bias


def rounding_sums(ck: Checkpoint, name: str, row: torch.Tensor, shift: float,
                  work: RoundingWork | None = None) -> torch.Tensor | None:
    """(:data:`SUMS`,) float64 ``[sum v, sum e v, sum e^2 v, sum v^2, b1, b2, b3, b4]`` of layer ``name`` of
    ``ck`` (``row``: its (1, P) dequantized values, ``e = row - shift``, ``v`` the rounding variance; ``b_n``
    the rounding's expected share of ``sum e^n``, :func:`moment_bias`), or None when the layer is not
    quantized or its format gives no variance. ``row`` goes to :meth:`~modelatlas.weights.Checkpoint.
    rounding_variance` as the layer's values, so that it is not dequantized again; ``work`` (float64 scratch
    of the layer's size, reused over models) saves allocating three. Time O(P) (the variance is read from the
    stored scales)."""
    if not ck.quantization(name):
        return None
    v = ck.rounding_variance(name, row)
    if v is None:
        return None
    work = RoundingWork(row.numel()) if work is None else work
    vd, e, ev = work.parts
    vd.copy_(v.reshape(-1))  # (P,) float64
    e.copy_(row.reshape(-1)).sub_(shift)  # (P,)
    torch.mul(e, vd, out=ev)
    sums = torch.stack([vd.sum(), ev.sum(), ev.mul_(e).sum(), torch.mul(vd, vd, out=ev).sum()])
    return torch.cat([sums, moment_bias(sums, ck.rounding_moments(name), shift)])


def moment_bias(sums: torch.Tensor, raw: torch.Tensor | None, shift: float) -> torch.Tensor:
    """(4,) the rounding's expected share of the power sums of ``e = x - shift``: from ``raw`` (``sum E[x^m] -
    w^m``, m = 1..4, :meth:`~modelatlas.weights.Checkpoint.rounding_moments`) shifted binomially,
    ``b_n = sum_m C(n, m) (-shift)^(n - m) raw_m``; without it the uniform error's ``[0, sum v, 3 sum e v,
    6 sum e^2 v - 4.2 sum v^2]`` from ``sums`` (the first four of :func:`rounding_sums`; the observed ``e``
    stands for the source's in ``sum e v`` and ``sum e^2 v``, whose expectation exceeds the source's by ``sum
    v^2``, hence 6 - 1.8 = 4.2). Time O(1)."""
    if raw is None:
        zero = torch.zeros((), dtype=torch.float64)
        return torch.stack([zero, sums[0], 3 * sums[1], 6 * sums[2] - (6 - UNIFORM_M4) * sums[3]])
    c = -shift
    d1, d2, d3, d4 = raw.double().unbind(0)
    return torch.stack([d1, d2 + 2 * c * d1, d3 + 3 * c * d2 + 3 * c**2 * d1,
                        d4 + 4 * c * d3 + 6 * c**2 * d2 + 4 * c**3 * d1])


class RoundingWork:
    """Three float64 tensors of ``p`` values that :func:`rounding_sums` computes in, made once per layer (at the
    first quantized model: a layer no model of which is quantized allocates nothing): a fresh 8 MB tensor per
    model costs a page fault per 4 KiB page, which measured ~5x the arithmetic (1M values)."""

    def __init__(self, p: int):
        self.p, self._parts = p, None

    @property
    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._parts is None:
            self._parts = tuple(torch.empty(self.p, dtype=torch.float64) for _ in range(3))
        return self._parts


def layer_kinds(ckpts: list[Checkpoint], info: TensorInfo) -> np.ndarray:
    """(N,) object array of each model's quantization type of layer ``info`` (None: stored unquantized, or no
    such layer yet read). Header only: time O(N)."""
    kinds = np.empty(len(ckpts), dtype=object)
    for i, ck in enumerate(ckpts):
        try:
            kinds[i] = ck.quantization(info.name)
        except (AtlasError, KeyError):  # the read reports it
            kinds[i] = None
    return kinds


@dataclass
class LayerNoise:
    """What :func:`_add_layer` takes a layer's rounding out with: the (N, SUMS) rounding sums, each model's
    quantization type (N,) and the Gram's sketch size (None: exact)."""

    sums: torch.Tensor
    kinds: np.ndarray
    k: int | None = None


def layer_rounding_sums(ckpts: list[Checkpoint], info: TensorInfo, x: torch.Tensor, shift: float,
                    failed: dict[int, str]) -> torch.Tensor:
    """(N, :data:`SUMS`) :func:`~modelatlas.lineage.rounding.rounding_sums` of layer ``info`` of every readable
    model (rows of ``x``); zeros for a model stored unquantized. Time O(P) per quantized model."""
    noise = torch.zeros(len(ckpts), SUMS, dtype=torch.float64)
    work = RoundingWork(info.numel)
    for i, ck in enumerate(ckpts):
        if i not in failed and (r := rounding_sums(ck, info.name, x[i:i + 1], shift, work)) is not None:
            noise[i] = r
    return noise


def debiased_moments(mom: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Power sums ``mom`` (N, 4) of ``e``, ``e^2``, ``e^3``, ``e^4`` with the rounding error's expected share
    taken out, given each model's :func:`rounding_sums` (N, :data:`SUMS`) (zeros for a model stored
    unquantized): less their last four, :func:`moment_bias`. Time O(N)."""
    return mom - sums[:, 4:]


@dataclass
class LayerRounding:
    """One layer's rounding, per model: ``energy`` (N,) ``sum v`` (0 unquantized), ``kinds`` (N,) its
    quantization type (None unquantized), ``p`` its number of weights."""

    energy: np.ndarray
    kinds: np.ndarray
    p: int

    def subset(self, idx) -> LayerRounding:
        return LayerRounding(self.energy[idx], self.kinds[idx], self.p)

    def same_kind(self) -> np.ndarray:
        """(N, N) bool: both models quantized to one type (one grid), off the diagonal. Time O(N^2)."""
        n = len(self.kinds)
        a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # (N, N) each
        return self._one_grid(a, b)

    def _one_grid(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Whether models ``a`` and ``b`` (index arrays of one shape) are two models quantized to one type."""
        ka = self.kinds[a]
        return (ka == self.kinds[b]) & (ka != None) & (a != b)  # noqa: E711 (elementwise)

    def pair_noise(self, a: np.ndarray, b: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """The rounding's share of the squared distances ``d2`` of the pairs (``a``, ``b``) (index arrays of one
        shape): both energies where the two roundings are independent; where both models are of one type
        (one grid: llama.cpp's files of a model and its fine-tune) it is what rounding one grid adds to a
        difference of the weights' (:func:`same_grid_noise`); 0 for two merged QLoRA models
        (:data:`MERGE_KIND`). Time O(B) for B pairs."""
        ea, eb = self.energy[a], self.energy[b]
        same = self._one_grid(a, b)
        noise = ea + eb
        if same.any():
            noise = np.where(same, same_grid_noise(d2, (ea + eb) / 2, self.p), noise)
            # two merged QLoRA models (lineage.qlora) of one NF4 base carry the one same rounding error,
            # which their difference does not hold at all
            noise = np.where(same & (self.kinds[a] == MERGE_KIND), 0.0, noise)
        return noise


def same_grid_noise(d2, energy, p: int):
    """The part of ``d2`` (squared distances of two models rounded on one grid, summed over ``p`` weights) that
    the rounding adds, each model's rounding ``energy`` (``sum v``) given. On one grid of step ``s`` a
    difference ``D`` of the weights reads as ``D^2 + s^2 f (1 - f)`` (``f`` the fraction of a step in ``|D|``:
    the two roundings agree unless a level falls between), so two roundings of close models are nearer than
    their two energies would say: for ``|D|`` well under a step they read ``s |D|`` and subtracting both
    energies (``s^2 / 6``) left nothing (a Q4_K_M file of a model and of its fine-tune 1 % away read -0.6 of
    their energies apart). With ``D`` Gaussian of RMS ``r s``, ``d2 / (p s^2) = r^2 + h(r)``, ``h(r) = E f (1 -
    f)`` (``s^2 = 12 energy / p``, the mean step): solved for ``r``, the share is ``p s^2 h(r)``; ``h`` reaches
    its independent value 1/6 from ``r ~ 0.5``. Time O(size) after a one-off table of O(10^5)."""
    r_grid, t_grid, h_grid = _h_table()
    step2 = np.maximum(12 * np.asarray(energy, dtype=np.float64) / max(p, 1), 1e-300)
    r = np.interp(np.asarray(d2, dtype=np.float64) / (p * step2), t_grid, r_grid)
    return p * step2 * np.interp(r, r_grid, h_grid)


@lru_cache(maxsize=1)
def _h_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r, r^2 + h(r), h(r)) on 2000 values of r in [0, 20], ``h(r) = E f(1 - f)`` with ``f`` the fractional
    part of ``|Z| r``, Z standard normal (quadrature on 0 <= z <= 9). Time O(2000 x 10^4) once."""
    z = np.linspace(0.0, 9.0, 9001)  # (Z,)
    w = 2 * np.exp(-z**2 / 2) / np.sqrt(2 * np.pi) * (z[1] - z[0])  # |Z|'s density x dz
    r = np.concatenate([np.linspace(0, 1, 1001), np.linspace(1.02, 20, 999)])  # (R,)
    f = np.mod(np.outer(r, z), 1.0)  # (R, Z)
    h = (f * (1 - f)) @ w
    h[r > 3] = 1 / 6  # settled (|h - 1/6| < 1e-6): the quadrature's own ripple there is larger
    return r, r**2 + h, h


def debiased_squared(d2: torch.Tensor, energy: torch.Tensor, layer: LayerRounding | None = None) -> torch.Tensor:
    """(N, N) squared distances ``d2`` less the rounding's share: both models' rounding energy ``energy``
    (N,) (``sum v``; 0 for a model stored unquantized), or, given ``layer``, :meth:`LayerRounding.pair_noise`
    (pairs of one type: one grid); floored at 0, the diagonal 0. Time O(N^2)."""
    if layer is None:
        out = d2 - energy[:, None] - energy[None, :]
    else:
        n = len(energy)
        a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # (N, N) each
        out = d2 - torch.from_numpy(layer.pair_noise(a, b, d2.numpy()))
    out = out.clamp_min(0)
    out.fill_diagonal_(0)
    return out


def rounding_excess(d2: torch.Tensor, sums: torch.Tensor, same: np.ndarray | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, N) ``d2`` less both models' rounding energy, (N, N) that difference's variance when the two are
    roundings of one model) for one layer, from each model's :func:`rounding_sums` (N, SUMS): the sum of ``P``
    squared uniform errors has variance ``(1.8 - 1) sum v^2``. Pairs of ``same`` (N, N) (one type: one
    grid) keep their whole ``d2``, of variance 0: two roundings of one model on one grid are equal there, so
    any difference is the weights'. (Such a layer used to make the pair's excess infinite: a K_M file and a
    Q8_0 file of one model, whose Q6_K layers both hold as Q8_0 where rows are short, were never one model.
    Two files of one type on every layer are one file, which the duplicate test finds:
    :func:`~modelatlas.lineage.copies.split_same_model` never pairs them.) Time O(N^2)."""
    v, v2 = sums[:, 0], sums[:, 3]
    excess = d2 - v[:, None] - v[None, :]
    spread = (UNIFORM_M4 - 1) * (v2[:, None] + v2[None, :])
    if same is not None and same.any():
        one = torch.from_numpy(same)
        excess = torch.where(one, d2, excess)
        spread = spread.masked_fill(one, 0.0)
    return excess, spread


def same_model_pairs(excess: np.ndarray, spread: np.ndarray, energy: np.ndarray, quantized: list[int],
                     z: float = SAME_MODEL_Z, rel: float = SAME_MODEL_REL) -> dict[int, int]:
    """Quantized models that are roundings of one model: coarser model -> a finer one it is within rounding
    of (``excess <= z sqrt(spread) + rel (E_q + E_r)``: its squared distance, summed over layers, no more than
    the two roundings explain; :func:`rounding_excess`), the closest pairs
    (excess relative to their energies) first; a model joins one that has joined none, and only when it is
    within rounding of each model already joined to it (two files of one type that differ cannot both be
    roundings of one model). ``energy``: (N,) summed rounding energy E (finer: smaller). A fine-tune within
    that tolerance passes too (for Q4_0, one ~1.5 % of the weights' RMS away: its rounding cannot tell it from
    its model). Time O(Q^2 log Q) for Q quantized models."""
    def within(q: int, r: int) -> bool:
        return spread[q, r] > 0 and excess[q, r] <= z * np.sqrt(spread[q, r]) + rel * (energy[q] + energy[r])

    pairs = sorted((excess[q, r] / max(energy[q] + energy[r], 1e-300), q, r) for q in quantized for r in quantized
                   if (energy[r], r) < (energy[q], q) and within(q, r))
    out: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for _, q, r in pairs:
        if q in out or r in out or q in members or not all(within(q, m) for m in members.get(r, [])):
            continue
        out[q] = r
        members.setdefault(r, []).append(q)
    return out


def debiased_singular_values(sv: torch.Tensor, energy: torch.Tensor, rows: int) -> torch.Tensor:
    """Singular values ``sv`` (B, s) of B sketched differences (each ``rows`` x s) with the rounding noise of
    summed energy ``energy`` (B,) (``sum v`` of both models; the sketch keeps it in expectation) shrunk out:
    the noise's per-entry variance is ``energy / (rows s)``; a value at or below the Marchenko-Pastur edge
    is 0, one above it its spiked-model inverse. Pairs of zero energy are returned as they are.
    Time O(B s)."""
    s = sv.shape[1]
    beta = s / rows
    unit = (energy / s).clamp_min(1e-300).sqrt()[:, None]  # (B, 1) sigma sqrt(rows)
    y = sv / unit
    a = y**2 - 1 - beta
    x2 = (a + (a**2 - 4 * beta).clamp_min(0).sqrt()) / 2
    shrunk = torch.where(y > 1 + beta**0.5, x2.clamp_min(0).sqrt() * unit, torch.zeros_like(sv))
    return torch.where((energy > 0)[:, None], shrunk, sv)

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

- squared distances: ``sum v`` of each quantized model of the pair (:func:`debiased_squared`);
- power sums of ``e = x - c``: ``E (e + u)^2 = e^2 + v``, ``E (e + u)^3 = e^3 + 3 e v``,
  ``E (e + u)^4 = e^4 + 6 e^2 v + 1.8 v^2`` (a uniform error's fourth moment is ``step^4 / 80 = 1.8 v^2``)
  (:func:`rounding_sums`, :func:`debiased_moments`);
- the singular values of sketched differences, for the nuclear norm: the noise adds a Marchenko-Pastur
  bulk, removed by the spiked-model inverse ``x^2 = ((y^2 - 1 - b) + sqrt((y^2 - 1 - b)^2 - 4 b)) / 2`` of
  each value ``y`` above the bulk's edge ``1 + sqrt(b)`` (in units of the noise; ``b`` the sketch's aspect
  ratio; Gavish & Donoho 2017, "Optimal shrinkage of singular values"), and 0 below it
  (:func:`debiased_singular_values`). The rank is counted before (see
  :func:`~modelatlas.lineage.spectra.spectral_distances`).

Measured (``bench/lineage_quantized.py --replace``, 10 held-out zoos, 360 edges, a third of the models only
as quantized files): Q4_0 224 -> 276 edges right, Q5_1 and Q8_0 in docs/benchmarks.md (session 30); without
quantization 345. Duplicate tests compare the values as read (``PairStats.stored_rel``): with the rounding
taken out, a stand-in and a model nearer it than its rounding read 0 apart.

A model made from a quantized model's dequantized values (a QLoRA merge) shares its rounding error, which
the subtraction then wrongly removes from their pair: such a merge reads nearer its base than it is.
"""

from __future__ import annotations

import numpy as np
import torch

from modelatlas.weights import Checkpoint

UNIFORM_M4 = 1.8  # E u^4 / (E u^2)^2 of a uniform error: (step^4 / 80) / (step^2 / 12)^2
SAME_MODEL_Z = 4.0  # standard deviations of the rounding's own spread within which two roundings are one model
# plus this share of their summed rounding energy: the variance read off the scales is the real error's to
# within a few % (0.97-1.03 for GGUF's legacy types on one layer), and that error adds up over layers where the
# spread does not (two roundings of one model read -2 % .. +5.4 % of it over 10 zoos, Q4_0 / Q5_1 / Q8_0)
SAME_MODEL_REL = 0.08


def rounding_sums(ck: Checkpoint, name: str, row: torch.Tensor, shift: float) -> torch.Tensor | None:
    """(4,) float64 ``[sum v, sum e v, sum e^2 v, sum v^2]`` of layer ``name`` of ``ck`` (``row``: its (1, P)
    dequantized values, ``e = row - shift``, ``v`` the rounding variance), or None when the layer is not
    quantized or its format gives no variance. Time O(P) (the variance is read from the stored scales)."""
    if not ck.quantization(name):
        return None
    v = ck.rounding_variance(name)
    if v is None:
        return None
    v = v.reshape(-1).double()  # (P,)
    e = row.reshape(-1).double() - shift  # (P,)
    ev = e * v
    return torch.stack([v.sum(), ev.sum(), (ev * e).sum(), (v * v).sum()])


def debiased_moments(mom: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Power sums ``mom`` (N, 4) of ``e``, ``e^2``, ``e^3``, ``e^4`` with the rounding error's expected share
    taken out, given each model's :func:`rounding_sums` (N, 4) (zeros for a model stored unquantized).
    The observed ``e`` stands for the source's in ``sum e v`` and ``sum e^2 v`` (whose expectation exceeds
    the source's by ``sum v^2``, hence 6 - 1.8 = 4.2). Time O(N)."""
    out = mom.clone()
    out[:, 1] -= sums[:, 0]
    out[:, 2] -= 3 * sums[:, 1]
    out[:, 3] -= 6 * sums[:, 2] - (6 - UNIFORM_M4) * sums[:, 3]
    return out


def debiased_squared(d2: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """(N, N) squared distances ``d2`` less both models' rounding energy ``energy`` (N,) (``sum v``; 0 for a
    model stored unquantized), floored at 0; the diagonal stays 0. Time O(N^2)."""
    out = (d2 - energy[:, None] - energy[None, :]).clamp_min(0)
    out.fill_diagonal_(0)
    return out


def rounding_excess(d2: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, N) ``d2`` less both models' rounding energy, (N, N) that difference's variance when the two are
    roundings of one model) for one layer, from each model's :func:`rounding_sums` (N, 4): the sum of ``P``
    squared uniform errors has variance ``(1.8 - 1) sum v^2``. Time O(N^2)."""
    v, v2 = sums[:, 0], sums[:, 3]
    return d2 - v[:, None] - v[None, :], (UNIFORM_M4 - 1) * (v2[:, None] + v2[None, :])


def same_model_pairs(excess: np.ndarray, spread: np.ndarray, energy: np.ndarray, quantized: list[int],
                     z: float = SAME_MODEL_Z, rel: float = SAME_MODEL_REL) -> dict[int, int]:
    """Quantized models that are roundings of one model: coarser model -> a finer one it is within rounding
    of (``excess <= z sqrt(spread) + rel (E_q + E_r)``: its squared distance, summed over layers, no more than
    the two roundings explain; :func:`rounding_excess`), the finest of ``quantized`` first, each coarser one
    joined to the nearest kept one (excess relative to their energies), so no chain forms. ``energy``: (N,)
    summed rounding energy E (finer: smaller). A fine-tune within that tolerance passes too (for Q4_0, one
    ~2 % of the weights' RMS away: its rounding cannot tell it from its model). Time O(Q^2) for Q quantized
    models."""
    kept: list[int] = []
    out: dict[int, int] = {}
    for q in sorted(quantized, key=lambda i: (energy[i], i)):
        both = [(energy[q] + energy[r], r) for r in kept if spread[q, r] > 0]
        near = [(excess[q, r] / e, r) for e, r in both if excess[q, r] <= z * np.sqrt(spread[q, r]) + rel * e]
        if near:
            out[q] = min(near)[1]
        else:
            kept.append(q)
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

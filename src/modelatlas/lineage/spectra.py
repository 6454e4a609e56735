"""The LoRA (low-rank) distance: seeded rank sketches of each model's layers and the rank and nuclear norm of
every pair's weight difference, computed from the sketches.

A random sketch ``W Omega`` (Omega: seeded Gaussian with orthonormal columns, m x s) is kept per model and
layer (:class:`RankSketch`, filled by :func:`modelatlas.lineage.distances.stream_pair_stats`); since it is
linear, ``(W_u - W_v) Omega = W_u Omega - W_v Omega``, and rank(W_u - W_v) is estimated from the singular
values of an (n, s) matrix instead of an SVD of the full (n, m) difference (:func:`spectral_distances`).
Layers with n > 2s rows are sketched on the left too (``Psi^T W Omega``, Psi a count sketch), so a pair costs
O(s^3) whatever the width. Time O(N n m + N s^2 m) for N models' sketches, O(K L n s^2) for K pairs.
"""

from __future__ import annotations

import numpy as np
import torch

from modelatlas.lineage.rounding import LayerRounding, debiased_singular_values
from modelatlas.seeding import derive_seed, torch_generator
from modelatlas.weights import TensorInfo

_PAIRS = 256  # pairs per batched eigvalsh call (buffers of 4 MB at s = 64: in cache)


class RankSketch:
    """The seeded rank sketch of one layer: ``W -> W Omega`` (Omega: m x s, Gaussian with orthonormal columns,
    exact when s = m), two-sided when n > 2s so that each pair's spectrum costs O(s^3) whatever the width:
    ``Psi^T W Omega`` with Psi (n x 2s) either a count sketch (``kind="count"``: row i, times a random sign, is
    added to bucket perm(i) mod 2s; O(n m), a gather of whole rows and one sum) or Gaussian (O(n m s)). The
    left reduction runs first, so Omega then costs O(s^2 m). Linear, shared by all models, keeps squared norms
    in expectation. Time O(R n m + R s^2 m) (count) or O(R n m s) (Gaussian) for R models."""

    def __init__(self, info: TensorInfo, sketch: int, seed: int, kind: str = "count"):
        self.rows = info.shape[0]
        self.cols = info.numel // self.rows
        s = min(sketch, self.rows, self.cols)
        self.omega = _sketch_matrix(self.cols, s, torch_generator(derive_seed(seed, info.name)))  # (m, s)
        self.psi = self.perm = None
        if self.rows > 2 * s and kind == "count":  # row perm[t] lands in slot t, bucket t mod 2s
            gen = torch_generator(derive_seed(seed, "rows", info.name))
            self.perm = torch.randperm(self.rows, generator=gen)  # (n,)
            self.slot_signs = (torch.randint(0, 2, (self.rows, 1), generator=gen) * 2 - 1).to(torch.float32)  # (n, 1)
            self.buckets, self.work = 2 * s, None
        elif self.rows > 2 * s:  # psi^T (W_u - W_v) Omega = Y_u - Y_v: still linear
            self.psi = _sketch_matrix(self.rows, 2 * s, torch_generator(derive_seed(seed, "rows", info.name)))  # (n, 2s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = x.view(len(x), self.rows, self.cols)  # (R, n, m)
        if self.perm is not None:
            return self._count_rows(w) @ self.omega  # (R, 2s, m) @ (m, s) -> (R, 2s, s)
        y = w @ self.omega  # (R, n, s)
        return y if self.psi is None else self.psi.T @ y  # (R, 2s, s)

    def _count_rows(self, w: torch.Tensor) -> torch.Tensor:
        """(R, 2s, m) bucket sums of the signed, permuted rows (slot t -> bucket t mod 2s). The gather goes into
        a reused workspace: a fresh one per model costs a page fault per 4 KiB."""
        r, n, m = w.shape
        if self.work is None or self.work.shape[0] != r:
            self.work = torch.empty(r, n, m, dtype=torch.float32)  # (R, n, m)
        g = torch.index_select(w, 1, self.perm, out=self.work).mul_(self.slot_signs)  # (R, n, m) rows permuted
        b = self.buckets
        full = n - n % b
        z = g[:, :full].view(r, full // b, b, m).sum(1)  # (R, n // 2s, 2s, m) -> (R, 2s, m)
        z[:, :n - full] += g[:, full:]  # the last n mod 2s slots: buckets 0 .. n mod 2s - 1
        return z


def _sketch_matrix(m: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """(m, s) random matrix with orthonormal columns scaled by sqrt(m / s): ``A Omega`` keeps A's
    singular values exactly when s = m and approximately (top of the spectrum) when s < m."""
    q, _ = torch.linalg.qr(torch.randn(m, s, generator=gen, dtype=torch.float64))  # (m, s)
    return (q * (m / s) ** 0.5).to(torch.float32)


def spectral_distances(sketches: list[np.ndarray], pairs: np.ndarray, rtol: float,
                       rounding: list[LayerRounding] | None = None, signal_ranks: bool = False,
                       common: list[float] | None = None) -> tuple:
    """Rank and nuclear norm of W_u - W_v for ``pairs`` (K, 2), from the sketches, summed over layers.

    For each layer the (n, s) sketch difference's singular values are computed batched over pairs.
    Rank: values below ``rtol`` x the largest, or below 1e-6 x the weights' own sketch norm (float
    noise), do not count. Nuclear norm: the sum of the singular values divided by sqrt(n m), so a rank-1
    difference scores its RMS; unlike the Frobenius norm it *adds* the sizes of updates that live in
    different subspaces (a grandparent is then clearly farther than a parent). ``rounding``: per layer, each
    model's rounding energy (N,) (quantized models; :mod:`.rounding`): a pair's noise bulk is shrunk out of
    its singular values before the nuclear norm is taken, not before the rank: the shrinkage drops every
    value under the noise's edge, a full fine-tune's small ones too, so a quantized model's pairs read ~10 %
    lower in rank than the same pairs unquantized and it drew its relatives to itself (164 of 360 held-out
    edges with a third of the models as Q4_0 files, 276 with the rank taken before; docs/benchmarks.md,
    session 30). Rounding noise raises a pair's rank to the sketch's (a full fine-tune's is near it anyway:
    247 of 256). Returns (ranks (K,), nuclear (K,), cap) where ``cap`` = sum of s over layers (the rank's
    saturation value); with
    ``signal_ranks``, also the ranks after the shrinkage (K,): a LoRA update's few large values stand above
    the noise, so a LoRA tree with quantized stand-ins still reads low-rank (equal where none is quantized),
    and the share of the update's energy (less the rounding's) those values carry (K,): ~1 for LoRA, small
    for a full update hidden under the noise (its few values over the edge are the bulk's; 1 unquantized).
    ``common``: per layer, a pair noise energy over whose edge (:func:`_detection_edge`) the signal ranks, the
    nuclear norm and the update's share are counted too, so that pairs of two noise levels compare (two types
    in one tree; the share over each pair's own edge read a one-grid pair's update, under far less noise than
    two independent roundings, as shown, and the tree took nuclear x rank where RMS placed 32 of 33 edges:
    ``bench/lineage_kquant_tree.py`` Q4_0+Q8_0/pure, session 34).
    Time O(K L n s^2), memory O(B n s) per batch of B pairs."""
    acc = np.zeros((5, len(pairs)))  # (5, K): ranks, signal ranks, signal energy, update energy, nuclear
    cap = 0
    for li, sk in enumerate(sketches):
        layer = rounding[li] if rounding else None
        cap += sk.shape[2]
        edge = 0.0 if common is None or layer is None else _detection_edge(common[li], sk.shape[1], sk.shape[2])
        acc += _layer_terms(torch.from_numpy(sk), pairs, rtol, layer, edge)
    ranks, signal, kept, update, nuc = acc
    if not signal_ranks:
        return ranks, nuc, cap
    seen = np.where(update > 0, kept / np.maximum(update, 1e-300), 1.0)
    return ranks, nuc, cap, signal, np.minimum(seen, 1.0)


def _layer_terms(y: torch.Tensor, pairs: np.ndarray, rtol: float, layer: LayerRounding | None, edge: float
                 ) -> np.ndarray:
    """One layer's :func:`_batch_terms` (5, K) for ``pairs`` (K, 2) of its sketches ``y`` (N, n, s), in batches
    of :data:`_PAIRS`. Time O(K n s^2)."""
    acc = np.zeros((5, len(pairs)))  # (5, K)
    norms = torch.linalg.matrix_norm(y, ord="fro")  # (N,)
    work = _SpectraWork(min(_PAIRS, len(pairs)), y.shape[1], y.shape[2])
    for a in range(0, len(pairs), _PAIRS):
        pr = torch.from_numpy(pairs[a:a + _PAIRS])
        sv = work.singular_values(y, pr)  # (B, s), descending
        floor = torch.maximum(rtol * sv[:, :1], 1e-6 * torch.maximum(norms[pr[:, 0]], norms[pr[:, 1]])[:, None])
        acc[:, a:a + _PAIRS] = _batch_terms(sv, floor, layer, pr, y.shape[1], edge)
    return acc


def _detection_edge(energy: float, rows: int, s: int) -> float:
    """The smallest shrunk singular value that noise of pair energy ``energy`` (a ``rows`` x ``s`` sketch)
    lets through: a value at the Marchenko-Pastur edge ``1 + sqrt(b)`` shrinks to ``b^(1/4)`` noise units
    (:func:`~.rounding.debiased_singular_values`). O(1)."""
    beta = s / rows
    return beta**0.25 * (max(energy, 0.0) / s) ** 0.5


def _batch_terms(sv: torch.Tensor, floor: torch.Tensor, layer: LayerRounding | None, pr: torch.Tensor,
                 rows: int, edge: float = 0.0) -> np.ndarray:
    """One layer's terms (5, B) for a batch of pairs ``pr`` (B, 2) of singular values ``sv`` (B, s) over
    ``floor`` (B, 1): rank; after the rounding's shrinkage, signal rank (values over ``edge`` too: a common
    noise's, :func:`_detection_edge`), the signal values' energy (over ``edge`` too), the update's energy
    (squared distance less the noise's), nuclear norm. Time O(B s)."""
    rank = (sv > floor).sum(1).numpy()
    total = (sv**2).sum(1).numpy()  # (B,)
    if layer is not None and bool((layer.energy[pr.numpy()] > 0).any()):  # after the rank: see spectral_distances
        sv, total = _shrunk(layer, sv, pr, rows)
    over = sv > floor
    numel = rows * sv.shape[1]  # (n s) stands for (n m): the sketch keeps norms
    seen = sv > edge  # (B, s) over a common noise's edge too (0: every value the shrinkage left)
    nuclear = (sv * seen).sum(1) / numel**0.5
    return np.stack([rank, (over & seen).sum(1).numpy(), (sv**2 * (over & seen)).sum(1).numpy(), total, nuclear.numpy()])


def _shrunk(layer: LayerRounding, sv: torch.Tensor, pr: torch.Tensor, rows: int) -> tuple[torch.Tensor, np.ndarray]:
    """Singular values ``sv`` (B, s) of the pairs ``pr`` (B, 2) with their rounding noise shrunk out, and the
    pairs' squared distances less that noise's energy (B,) (at least 0):
    (:func:`~modelatlas.lineage.rounding.debiased_singular_values`; the noise's energy from
    :meth:`~modelatlas.lineage.rounding.LayerRounding.pair_noise`, the sketch keeping squared distances in
    expectation). Time O(B s)."""
    total = (sv**2).sum(1).numpy()  # (B,)
    noise = layer.pair_noise(pr[:, 0].numpy(), pr[:, 1].numpy(), total)
    return debiased_singular_values(sv, torch.from_numpy(noise), rows), np.maximum(total - noise, 0.0)


class _SpectraWork:
    """Reused buffers of one layer's batched spectra: difference (B, n, s), Gram (B, s, s), eigenvalues (B, s);
    allocated once (fresh pages cost a page fault each, as much as the products on small batches)."""

    def __init__(self, b: int, n: int, s: int):
        self.diff = torch.empty(b, n, s, dtype=torch.float32)
        self.other = torch.empty(b, n, s, dtype=torch.float32)
        self.gram = torch.empty(b, s, s, dtype=torch.float32)
        self.eig = torch.empty(b, s, dtype=torch.float32)

    def singular_values(self, y: torch.Tensor, pr: torch.Tensor) -> torch.Tensor:
        """(B, s) float64 singular values of y[u] - y[v] for the pairs ``pr`` (B, 2), descending, from the
        eigenvalues of the (s, s) Gram in float32: several times faster than svdvals, and float32 is enough (a
        1e-2 relative tolerance on singular values is 1e-4 on eigenvalues, eps is 1e-7). Time O(B (n s^2 + s^3))."""
        b = len(pr)
        diff, other, gram, eig = self.diff[:b], self.other[:b], self.gram[:b], self.eig[:b]
        torch.index_select(y, 0, pr[:, 0], out=diff)  # (B, n, s)
        torch.index_select(y, 0, pr[:, 1], out=other)
        diff.sub_(other)
        torch.bmm(diff.transpose(1, 2), diff, out=gram)  # (B, s, s)
        _eigvalsh_split(gram, eig)  # (B, s), ascending
        return eig.double().clamp_min(0).sqrt().flip(1)


def _eigvalsh_split(gram: torch.Tensor, eig: torch.Tensor) -> None:
    """``eigvalsh(gram, out=eig)``, with the batch split over torch's thread count in a thread pool: torch's
    batched eigvalsh runs its matrices one after another whatever the intra-op threads (measured: 36 ms per
    512 problems of 64 x 64 with 1 or 2 threads, 19 ms split over 2 Python threads). Each matrix is computed
    as in one call, so the result does not depend on the split."""
    workers = min(torch.get_num_threads(), max(1, len(gram) // 32))
    if workers <= 1:
        torch.linalg.eigvalsh(gram, out=eig)
        return
    from concurrent.futures import ThreadPoolExecutor

    cuts = [len(gram) * k // workers for k in range(workers + 1)]
    with ThreadPoolExecutor(workers) as pool:  # torch releases the GIL inside eigvalsh
        list(pool.map(lambda k: torch.linalg.eigvalsh(gram[cuts[k]:cuts[k + 1]], out=eig[cuts[k]:cuts[k + 1]]),
                      range(workers)))

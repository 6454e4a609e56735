"""PoCO: the class order of a PoDD poster (Shul, Horwitz & Hoshen, TMLR 2025, Sec. "Poster class ordering").

Similar classes should be neighbours on the poster so that the crops straddling them are plausible images.
(1) Class distances: 1 - cosine of the class names' MiniLM text embeddings; when the names carry no meaning
    (digits, "class_3") or the offline text model is missing, Euclidean distances of the class-mean images.
(2) Fill the (rows, cols) class grid in anti-diagonal order (cells by r + c, then by r); the first cell takes
    the most peripheral class (largest summed distance to all others, so a chain starts at an end), every
    further cell the unused class with the least summed distance to its already placed 4-neighbours.
Time O(K^2) for the greedy fill (plus K text embeddings or O(N D) for the class means).
"""

from __future__ import annotations

import re

import numpy as np
import torch

_UNINFORMATIVE = re.compile(r"^\W*(class|label|c)?[\W_]*\d+\W*$", re.IGNORECASE)


def antidiagonal_cells(rows: int, cols: int) -> list[tuple[int, int]]:
    """Grid cells ordered by anti-diagonal (r + c), then by row."""
    return [(r, d - r) for d in range(rows + cols - 1) for r in range(rows) if 0 <= d - r < cols]


def greedy_order(dist: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Step (2): the (rows, cols) class grid from a (K, K) distance matrix (K = rows x cols)."""
    k = dist.shape[0]
    grid = -np.ones((rows, cols), dtype=np.int64)
    unused = list(range(k))
    for r, c in antidiagonal_cells(rows, cols):
        nbrs = [grid[i, j] for i, j in ((r - 1, c), (r, c - 1), (r + 1, c), (r, c + 1))
                if 0 <= i < rows and 0 <= j < cols and grid[i, j] >= 0]
        if nbrs:
            scores = [dist[u, nbrs].sum() for u in unused]
            pick = unused[int(np.argmin(scores))]
        else:
            pick = unused[int(np.argmax([dist[u].sum() for u in unused]))]
        grid[r, c] = pick
        unused.remove(pick)
    return grid


def grid_cost(grid: np.ndarray, dist: np.ndarray) -> float:
    """Sum of distances between 4-neighbouring classes (what the greedy fill keeps small)."""
    right = dist[grid[:, :-1], grid[:, 1:]].sum()
    down = dist[grid[:-1, :], grid[1:, :]].sum()
    return float(right + down)


def informative(names: list[str]) -> bool:
    """False when every class name is a number ("3", "class_3")."""
    return not all(_UNINFORMATIVE.match(str(n)) for n in names)


def class_distances(names: list[str], x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[np.ndarray, str]:
    """Step (1): ((K, K) distances, "text" or "images")."""
    if informative(names):
        try:
            from modelatlas.probex.text_encoder import encode_texts

            emb = encode_texts([str(n) for n in names])  # (K, 384), unit norm
            return 1.0 - emb @ emb.T, "text"
        except (ImportError, OSError, RuntimeError, ValueError):
            pass  # the offline model is missing or broken: fall back to images
    means = torch.stack([x[y == c].float().mean(0).reshape(-1) for c in range(k)]).numpy()  # (K, D)
    return np.sqrt(((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)), "images"

"""PoDD poster geometry and labels (Shul, Horwitz & Hoshen, "Distilling Datasets Into Less Than One Image",
TMLR 2025).

The whole synthetic set is one poster (C, H_p, W_p). Its training images are (h, w) crops at the fixed grid
``linspace(0, W_p - w, n_x)`` x ``linspace(0, H_p - h, n_y)`` (rounded), so neighbours overlap heavily. The
poster is divided into a class grid (rows x cols = K cells, one class each); images per class
IPC = H_p W_p / (K H W). Size rule (reproduces the paper's 60 x 153 for CIFAR-10 at 0.9 IPC):
H_p = max(h, floor(rows sqrt(ipc) H)), W_p = max(w, floor(ipc K H W / H_p)); crops per row
n_x = round((W_p - w) / (w / 4)) + 1 (stride ~ a quarter image) and n_y = round(n_x H_p / W_p) (the paper's
16 x 6 for 60 x 153), 1 when the poster is one image high.

Labels: without learning, a crop's label is softmax(pixel counts of each class inside it / temperature).
PoDDL: a learnable (L_y, L_x, K) label grid (the class grid refined ``refine`` times per axis, so at most
K x crops-per-class cells), initialised one-hot by class region; a crop's label is the normalised sum of the
cells whose centres lie under its window shrunk by ``shrink`` (clipped at >= 0).
All functions are O(N_crops x (h w + cells)) time and memory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from modelatlas.errors import ConfigError


@dataclass
class Layout:
    """Where everything sits on a poster (JSON-serialisable; saved in the result's ``synthetic.json``)."""

    height: int
    width: int
    crop_h: int
    crop_w: int
    n_x: int
    n_y: int
    rows: int
    cols: int
    refine: int = 1
    shrink: float = 0.25
    temperature: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def num_crops(self) -> int:
        return self.n_x * self.n_y

    def ipc(self, num_classes: int) -> float:
        """Images per class: H_p W_p / (K h w)."""
        return self.height * self.width / (num_classes * self.crop_h * self.crop_w)


def class_grid_shape(k: int) -> tuple[int, int]:
    """(rows, cols) with rows the largest divisor of K <= sqrt(K): 10 -> (2, 5), 100 -> (10, 10)."""
    rows = max(d for d in range(1, int(math.isqrt(k)) + 1) if k % d == 0)
    return rows, k // rows


def auto_crops(height: int, width: int, h: int, w: int) -> tuple[int, int]:
    """(n_x, n_y) by the module docstring's rule."""
    n_x = 1 if width == w else max(2, round((width - w) / (w / 4)) + 1)
    n_y = 1 if height == h else max(2, round(n_x * height / width))
    return n_x, n_y


def make_layout(ipc: float, k: int, h: int, w: int, crops: tuple[int | None, int | None] = (None, None),
                refine: int | None = None, shrink: float = 0.25, temperature: float = 1.0) -> Layout:
    """The poster layout for a target ``ipc`` (images per class, may be < 1) of K classes of (h, w) images."""
    if not (ipc > 0 and math.isfinite(ipc)):  # inf: OverflowError sizing the poster
        raise ConfigError(f"poster ipc must be a finite number > 0 (--ipc / --set poster_ipc=), got {ipc}")
    if ipc * k < 1 - 1e-9:  # the smallest poster is one image: it would silently become 1/K
        raise ConfigError(f"poster ipc {ipc:g} is below the smallest poster, one image for {k} classes "
                          f"(ipc {1 / k:.3g}); use an ipc >= {1 / k:.3g}")
    rows, cols = class_grid_shape(k)
    height = max(h, int(rows * math.sqrt(ipc) * h))
    width = max(w, int(ipc * k * h * w / height))
    auto = auto_crops(height, width, h, w)
    n_x, n_y = crops[0] or auto[0], crops[1] or auto[1]
    if (n_x > 1 and width == w) or (n_y > 1 and height == h):
        raise ConfigError(f"crops_x/crops_y ({n_x}, {n_y}) need a poster wider/taller than one image "
                          f"({height} x {width}); use 1 or a larger ipc")
    _check_grids(height, width, h, w, crops, refine, (rows, cols))  # the asked ones (auto may repeat a crop)
    if refine is None:  # PoDDL: at most K x crops-per-class label cells
        refine = max(1, math.isqrt(max(n_x * n_y // k, 1)))
    return Layout(height, width, h, w, n_x, n_y, rows, cols, refine, shrink, temperature)


def _check_grids(height: int, width: int, h: int, w: int, crops: tuple[int | None, int | None],
                 refine: int | None, grid: tuple[int, int]) -> None:
    """Refuse asked crop counts above the distinct crop positions (10**6 identical crops ran for minutes) and
    label cells smaller than a pixel (label_refine 10**6 asked the allocator for terabytes)."""
    for name, n, free, way in (("crops_x", crops[0], width - w + 1, "across"), ("crops_y", crops[1], height - h + 1, "down")):
        if n is not None and n > free:
            raise ConfigError(f"{name} {n} is more than the {free} distinct crop positions {way} the {height} x "
                              f"{width} poster; lower {name}")
    top = min(height // grid[0], width // grid[1])
    if refine is not None and refine > top:
        raise ConfigError(f"label_refine {refine} makes label cells smaller than a pixel ({grid[0] * refine} x "
                          f"{grid[1] * refine} cells on a {height} x {width} poster); use at most {top}")


def crop_positions(layout: Layout) -> torch.Tensor:
    """(N, 2) integer (y, x) top-left corners, row-major over the crop grid."""
    ys = torch.linspace(0, layout.height - layout.crop_h, layout.n_y).round().long()  # (n_y,)
    xs = torch.linspace(0, layout.width - layout.crop_w, layout.n_x).round().long()  # (n_x,)
    return torch.cartesian_prod(ys, xs)  # (n_y * n_x, 2)


def extract_crops(poster: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The training images (N, C, h, w) of a poster (C, H_p, W_p); differentiable."""
    pos = crop_positions(layout).tolist()
    return torch.stack([poster[:, y:y + layout.crop_h, x:x + layout.crop_w] for y, x in pos])


def edges(size: int, parts: int) -> list[int]:
    """Integer boundaries splitting ``size`` pixels into ``parts`` near-equal cells."""
    return torch.linspace(0, size, parts + 1).round().long().tolist()


def class_map(layout: Layout, class_grid: torch.Tensor) -> torch.Tensor:
    """(H_p, W_p) class index of every poster pixel under the (rows, cols) class grid."""
    ry, rx = edges(layout.height, layout.rows), edges(layout.width, layout.cols)
    out = torch.empty(layout.height, layout.width, dtype=torch.long)
    for r in range(layout.rows):
        for c in range(layout.cols):
            out[ry[r]:ry[r + 1], rx[c]:rx[c + 1]] = int(class_grid[r, c])
    return out


def count_labels(layout: Layout, class_grid: torch.Tensor, k: int) -> torch.Tensor:
    """(N, K) softmax(pixel counts of each class inside each crop / temperature)."""
    cmap = class_map(layout, class_grid)
    counts = torch.stack([torch.bincount(cmap[y:y + layout.crop_h, x:x + layout.crop_w].reshape(-1), minlength=k)
                          for y, x in crop_positions(layout).tolist()]).float()  # (N, K)
    return torch.softmax(counts / layout.temperature, dim=1)


def init_label_grid(layout: Layout, class_grid: torch.Tensor, k: int) -> torch.Tensor:
    """(L_y, L_x, K) one-hot label cells: cell (i, j) gets the class of region (i // refine, j // refine)."""
    r = layout.refine
    cells = class_grid.repeat_interleave(r, 0).repeat_interleave(r, 1)  # (rows r, cols r)
    return torch.nn.functional.one_hot(cells.long(), k).float()


def label_weights(layout: Layout) -> torch.Tensor:
    """(N, L_y L_x) 0/1: the label cells whose centres lie in each crop's shrunk window (else the cell
    holding the window centre)."""
    ly, lx = layout.rows * layout.refine, layout.cols * layout.refine
    cy = (torch.arange(ly) + 0.5) * layout.height / ly  # (L_y,) cell centres in pixels
    cx = (torch.arange(lx) + 0.5) * layout.width / lx
    my, mx = layout.shrink * layout.crop_h / 2, layout.shrink * layout.crop_w / 2
    rows = []
    for y, x in crop_positions(layout).tolist():
        iny = (cy >= y + my) & (cy <= y + layout.crop_h - my)  # (L_y,)
        inx = (cx >= x + mx) & (cx <= x + layout.crop_w - mx)
        wgt = (iny[:, None] & inx[None, :]).float()  # (L_y, L_x)
        if wgt.sum() == 0:
            i = min(int((y + layout.crop_h / 2) * ly / layout.height), ly - 1)
            j = min(int((x + layout.crop_w / 2) * lx / layout.width), lx - 1)
            wgt[i, j] = 1.0
        rows.append(wgt.reshape(-1))
    return torch.stack(rows)  # (N, L_y * L_x)


def grid_labels(label_grid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, K) crop labels: normalised sum of the (clipped >= 0) cells under each window; differentiable."""
    cells = label_grid.clamp(min=0).reshape(-1, label_grid.shape[-1])  # (L_y L_x, K)
    summed = weights.to(cells) @ cells  # (N, K)
    return summed / summed.sum(1, keepdim=True).clamp(min=1e-8)

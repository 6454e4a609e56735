"""PNG of a PoDD poster: the poster (inverse-transformed for display) with its crop grid (thin boxes), the
class grid (thick lines) and each class cell's name. O(C H_p W_p + crops) to draw."""

from __future__ import annotations

import torch

from modelatlas.distill.methods.podd import poster as P
from modelatlas.distill.result import show_image
from modelatlas.distill.synthetic import SyntheticSet
from modelatlas.figures import new_figure, png_bytes

POSTER_PNG = "poster.png"


def _display(poster: torch.Tensor, transform) -> torch.Tensor:
    img = poster.detach().cpu()
    if transform is not None:
        try:
            img = transform.inverse(img[None])[0]
        except (RuntimeError, ValueError):  # a per-pixel transform fitted at image size: show raw values
            pass
    if img.min() < 0 or img.max() > 1:
        img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-8)
    return img.clamp(0, 1)


def render_poster(syn: SyntheticSet, transform=None) -> bytes:
    """PNG bytes of ``syn.extras["poster"]`` with crop grid and class layout drawn."""
    from matplotlib.patches import Rectangle

    layout = P.Layout(**syn.meta["poster"])
    img, grid = _display(syn.extras["poster"], transform), syn.extras["class_grid"]
    fig, ax = new_figure(poster_figsize(layout.height, layout.width))
    show_image(ax, img)
    for y, x in P.crop_positions(layout).tolist():
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), layout.crop_w, layout.crop_h, fill=False, lw=0.4,
                               ec="tab:cyan", alpha=0.5))
    ry, rx = P.edges(layout.height, layout.rows), P.edges(layout.width, layout.cols)
    for r in range(layout.rows):
        for c in range(layout.cols):
            ax.add_patch(Rectangle((rx[c] - 0.5, ry[r] - 0.5), rx[c + 1] - rx[c], ry[r + 1] - ry[r], fill=False,
                                   lw=1.5, ec="tab:red"))
            ax.text(rx[c] + 0.3, ry[r] + 0.3, syn.class_names[int(grid[r, c])][:12], color="yellow", fontsize=7,
                    va="top", ha="left", bbox={"facecolor": "black", "alpha": 0.4, "pad": 1, "lw": 0})
    ax.set_title(f"poster {layout.height}x{layout.width}, {layout.n_x}x{layout.n_y} crops, "
                 f"{layout.ipc(syn.num_classes):.2f} IPC", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return png_bytes(fig)


def poster_figsize(height: int, width: int, long_side: float = 8.0, dpi: int = 100) -> tuple[float, float]:
    """(width, height) in inches: the poster's aspect ratio, its long side ``long_side`` inches, but never
    under 1.5 screen pixels per poster pixel (a large poster is not shrunk) nor over 0.3 in (a tiny one is
    not blown up into blocks), plus room for the title."""
    scale = max(min(0.3, long_side / max(height, width)), 1.5 / dpi)
    return width * scale + 0.4, height * scale + 0.6

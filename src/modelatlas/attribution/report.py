"""Writing an attribution: ``attribution.safetensors`` + ``attribution.json`` and a PNG of the most helpful and
most harmful clusters of chosen test samples (cluster representatives = mean real image of the cluster).
Everything is written atomically. Cost O(K_total x n_test) to save; the plot O(#samples x top).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from modelatlas.atomic import atomic_save_tensors, atomic_write_bytes, atomic_write_json, check_out_folder
from modelatlas.attribution.checkpoint import kept_state
from modelatlas.attribution.ddm import Attribution
from modelatlas.errors import ConfigError
from modelatlas.figures import new_figure, png_bytes

TENSORS, META, PLOT = "attribution.safetensors", "attribution.json", "attribution.png"


def cluster_means(x: torch.Tensor, assign: torch.Tensor, k_total: int) -> torch.Tensor:
    """(K_total, C, H, W) mean real image of each cluster."""
    counts = torch.bincount(assign, minlength=k_total).clamp(min=1).float()
    sums = torch.zeros(k_total, *x.shape[1:]).index_add_(0, assign, x)
    return sums / counts.view(-1, *[1] * (x.dim() - 1))


def top_clusters(matrix: torch.Tensor, j: int, top: int) -> tuple[list[int], list[int]]:
    """(most helpful: largest loss increase when removed, most harmful: largest decrease) for test sample j;
    only clusters that did help (> 0) or harm (< 0), so either list may be shorter than ``top``."""
    order = torch.argsort(matrix[:, j], descending=True)
    helpful = [k for k in order[:top].tolist() if float(matrix[k, j]) > 0]
    harmful = [k for k in order.flip(0)[:top].tolist() if float(matrix[k, j]) < 0]
    return helpful, harmful


def check_out(folder: str | Path) -> Path:
    """Refuse an output path that is a file or lies below one, or a non-empty folder holding no attribution (another
    command's results would get attribution files mixed in); a previous attribution is overwritten, and a folder
    holding only an interrupted run's ``checkpoint`` is one of ours."""
    folder = Path(folder)
    # below a file was 'Not a directory' when saving, after the whole attribution
    check_out_folder(folder, f"{folder}:", "choose another output folder (--out)")
    entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    ours = TENSORS in entries or META in entries or kept_state(folder) is not None  # or a resumable run
    if entries and not ours:
        raise ConfigError(f"{folder}: a non-empty folder holding no attribution (e.g. {entries[0]!r}); "
                          "choose a new or empty output folder (--out)")
    return folder


def save_attribution(folder: str | Path, attr: Attribution, info: dict, true_matrix: torch.Tensor | None = None,
                     png: bytes | None = None) -> Path:
    """Write the tensors, the plot (``png``, from :func:`render_top_clusters`) and, last, ``attribution.json``
    with the SHA-256 of the other two: each file is replaced atomically, and a run killed between the
    writes leaves a JSON whose ``files`` digests do not match the newer tensors, so a mixed set is detectable."""
    folder = check_out(folder)
    tensors = {"matrix": attr.matrix, "assign": attr.assign, "cluster_class": attr.cluster_class,
               "synthetic": attr.synthetic, "synthetic_labels": attr.synthetic_labels, "base_losses": attr.base_losses}
    if true_matrix is not None:
        tensors["loo_matrix"] = true_matrix
    atomic_save_tensors(folder / TENSORS, tensors)
    if png is not None:
        atomic_write_bytes(folder / PLOT, png)
    files = {name: _sha256(folder / name) for name in (TENSORS, PLOT) if name == TENSORS or png is not None}
    atomic_write_json(folder / META, {**info, "shape": list(attr.matrix.shape), "timings": attr.timings,
                                      "match_loss_first_last": attr.match_losses[:1] + attr.match_losses[-1:],
                                      "sign": "A[k, j] = test loss of j after removing cluster k - before; "
                                              "positive = cluster k helped j", "files": files})
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render_top_clusters(attr: Attribution, x_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                        test_index: list[int], top: int = 3, class_names: list[str] | None = None) -> bytes:
    """PNG bytes: one row per test sample: the sample, its ``top`` most helpful and most harmful clusters,
    classes named by ``class_names`` (their first 14 characters; None: their indices)."""
    def named(c) -> str:
        return str(int(c)) if class_names is None else str(class_names[int(c)])[:14]

    test_index = list(dict.fromkeys(test_index))  # a sample asked for twice is one row
    reps = cluster_means(x_train, attr.assign, len(attr.cluster_class))
    cols = 1 + 2 * top
    fig, axes = new_figure((cols * 1.2, len(test_index) * 1.4), len(test_index), cols)
    for r, j in enumerate(test_index):
        helpful, harmful = top_clusters(attr.matrix, j, top)
        panels = [(x_test[j], f"test {j} (y={named(y_test[j])})")]
        for sign, ks in (("+", helpful), ("-", harmful)):  # a column stays empty when fewer clusters helped/harmed
            panels += [(reps[k], f"{sign} c{k} ({named(attr.cluster_class[k])})\n{float(attr.matrix[k, j]):+.3f}")
                       for k in ks] + [(None, f"{sign} none")] * (top - len(ks))
        for c, (img, title) in enumerate(panels):
            _panel(axes[r][c], img, title)
    fig.suptitle("most helpful (+) and most harmful (-) clusters: change in test loss when removed", fontsize=7)
    return png_bytes(fig)


def _panel(ax, img: torch.Tensor | None, title: str) -> None:
    ax.set_title(title, fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])
    if img is None:
        ax.set_axis_off()
    elif img.shape[0] == 3:  # RGB
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
    else:
        ax.imshow(img[0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)

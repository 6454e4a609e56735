"""The result folder of a distillation run.

``DIR/``
- ``synthetic.safetensors`` + ``synthetic.json``: the synthetic set (images, class layout, soft labels,
  learned lr, extras) -- see :class:`~modelatlas.distill.synthetic.SyntheticSet`;
- ``transform.safetensors``: the fitted data transform S lives in (standardisation, ZCA, or none); its
  kind is in ``result.json``. Apply it to the test set before evaluating;
- ``result.json``: method, dataset, ipc, seed, config, evaluation (mean/std test accuracy, per-network
  accuracies, protocol), optional baseline, distillation wall time, loss history;
- ``images.png``: a grid of the synthetic images (one row per class, or at IPC 1 the classes side by side;
  inverse-transformed for display);
- ``loss.png``: the learning curve (loss per outer iteration);
- PoDD sets (``"poster"`` in ``extras``) are stored as the poster + label grid + layout, not as their crops
  (rebuilt on load), and get ``poster.png`` (poster with crop grid and class layout).
Every file is written atomically (temporary file + rename), ``result.json`` last.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelatlas.atomic import atomic_save_tensors, atomic_write_bytes, atomic_write_json, read_tensors
from modelatlas.data import transforms as T
from modelatlas.distill.evaluate import LABEL_GENERATORS
from modelatlas.distill.loop import CHECKPOINT_JSON, read_json
from modelatlas.distill.synthetic import META_FILE, SyntheticSet
from modelatlas.errors import CheckpointError, ConfigError
from modelatlas.figures import new_figure, png_bytes

RESULT_JSON, TRANSFORM_FILE, IMAGES_PNG, LOSS_PNG = "result.json", "transform.safetensors", "images.png", "loss.png"


def write_result(folder: str | Path, syn: SyntheticSet, transform, info: dict, losses: list[float]) -> Path:
    """Write the whole result folder; ``info`` becomes ``result.json`` (plus the transform kind), written last
    and after the figures are drawn: a run stopped on the way keeps the result.json of before, which a resume
    does not take for this run's (a Ctrl-C while drawing left old figures beside a new, 'finished' result.json)."""
    folder = Path(folder)
    figures = {IMAGES_PNG: render_grid(syn, transform), LOSS_PNG: render_losses(losses, info.get("method", ""))}
    if "poster" in syn.extras:  # PoDD: store the poster, not its crops; draw it
        from modelatlas.distill.methods.podd.method import compact
        from modelatlas.distill.methods.podd.render import POSTER_PNG, render_poster

        figures[POSTER_PNG] = render_poster(syn, transform)
        compact(syn).save(folder)
    else:
        syn.save(folder)
    state = transform.state_dict() if transform is not None else {}
    atomic_save_tensors(folder / TRANSFORM_FILE, state or {"none": torch.zeros(1)})
    for name, png in figures.items():
        atomic_write_bytes(folder / name, png)
    kind = getattr(transform, "kind", "identity")
    atomic_write_json(folder / RESULT_JSON, {**info, "transform": kind, "losses": losses})
    return folder


def update_result(folder: str | Path, **fields) -> dict:
    """Merge ``fields`` into an existing ``result.json`` (e.g. a re-evaluation); returns the new dict."""
    info = read_info(folder)
    info.update(fields)
    atomic_write_json(Path(folder) / RESULT_JSON, info)
    return info


def read_info(folder: str | Path) -> dict:
    if Path(folder).is_file():  # its result.json or synthetic.safetensors: read as "result.json/result.json"
        parent = Path(folder).parent  # named only when it is a result: a lineage JSON's folder was named too
        named = f" ({parent})" if (parent / RESULT_JSON).is_file() else ""
        raise CheckpointError(folder, f"a file, not a distillation result folder; pass the folder "
                                      f"`atlas distill run --out` wrote{named}")
    if not Path(folder).exists():
        raise CheckpointError(folder, "no such folder; give a result folder of `atlas distill run --out`")
    path = Path(folder) / RESULT_JSON
    if not path.is_file() and (Path(folder) / "checkpoint" / CHECKPOINT_JSON).is_file():  # an interrupted run
        raise CheckpointError(path, f"missing: the run stopped before its result (its progress is in "
                                    f"{Path(folder) / 'checkpoint'}); rerun the command that started it with --resume")
    if not path.is_file():
        raise CheckpointError(path, "missing; not a distillation result folder (run `atlas distill run` first)")
    info = read_json(path, "run the distillation again")
    if not isinstance(info, dict):
        raise CheckpointError(path, "is not a JSON object (not a result.json of `atlas distill`); run the "
                                    "distillation again")
    return info


def load_result(folder: str | Path) -> tuple[SyntheticSet, object, dict]:
    """(synthetic set, fitted transform, result.json dict) of a result folder."""
    folder = Path(folder)
    info = read_info(folder)
    syn = SyntheticSet.load(folder)
    gen = syn.meta.get("label_generator")
    if gen is not None and gen not in LABEL_GENERATORS:  # a JSON file must not choose a function to call
        raise CheckpointError(folder / META_FILE, f"meta label_generator {gen!r} is not a known label generator; "
                                                  f"known: {', '.join(LABEL_GENERATORS)}")
    if gen is not None and gen.startswith("modelatlas.distill.methods.hello."):  # its projector's tensors
        from modelatlas.distill.methods.hello.stored import check_stored as check_hello

        check_hello(syn, folder)
    if syn.meta.get("stored") == "poster":
        from modelatlas.distill.methods.podd.method import expand
        from modelatlas.distill.methods.podd.stored import check_stored

        check_stored(syn, folder)
        syn = expand(syn)
    return syn, _load_transform(folder, info.get("transform", "identity"), syn), info


def _load_transform(folder: Path, kind: object, syn: SyntheticSet):
    """The fitted transform of ``kind`` saved in ``folder``, checked to fit the set's images."""
    tpath, kind = folder / TRANSFORM_FILE, kind or "identity"
    if kind not in T.KINDS:
        raise CheckpointError(folder / RESULT_JSON, f"unknown transform {kind!r}; known: {', '.join(T.KINDS)}")
    if kind != "identity" and not tpath.is_file():
        raise CheckpointError(tpath, f"missing; the {kind!r} transform of this result cannot be rebuilt")
    state = read_tensors(tpath) if tpath.is_file() else {}
    try:
        tf = T.from_state_dict(kind, state)
    except ConfigError as e:
        raise CheckpointError(tpath, str(e)) from None
    one = syn.images[:1].detach()
    try:
        fits = len(syn) == 0 or tf.transform(one).shape == one.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise CheckpointError(tpath, f"the {kind!r} transform does not fit images of shape "
                                     f"{tuple(syn.images.shape[1:])}; it belongs to another result")
    return tf


def render_grid(syn: SyntheticSet, transform=None, max_per_class: int = 10) -> bytes:
    """PNG bytes: one row per class, up to ``max_per_class`` images; with one image per class, the classes
    side by side in rows of 10 (a column of 10 single images is hard to read); 1-D signals and (D,) vectors are
    drawn as curves."""
    x = syn.images.detach().cpu()
    if transform is not None:
        x = transform.inverse(x)
    k, cols = min(syn.num_classes, MAX_CLASSES_DRAWN), max(1, min(syn.ipc or 1, max_per_class))
    if cols == 1:
        return png_bytes(_one_per_class(x, syn))
    fig, axes = new_figure((cols * 1.0 + 0.6, k * 1.0), k, cols)
    _note_classes_left_out(fig, syn.num_classes)
    for c in range(k):
        imgs = x[syn.classes.cpu() == c][:cols]
        for j in range(cols):
            ax = axes[c][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(imgs):
                _draw(ax, imgs[j])
        axes[c][0].set_ylabel(syn.class_names[c][:10], fontsize=7)
    return png_bytes(fig)


def _one_per_class(x: torch.Tensor, syn: SyntheticSet):
    """A figure of each class's first image, titled with the class name, 10 classes per row."""
    k = min(syn.num_classes, MAX_CLASSES_DRAWN)
    cols, rows = min(k, 10), -(-k // 10)
    fig, axes = new_figure((cols * 1.0, rows * 1.2), rows, cols)
    _note_classes_left_out(fig, syn.num_classes)
    classes = syn.classes.cpu()
    for c, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if c >= k:
            ax.set_axis_off()
            continue
        ax.set_title(syn.class_names[c][:10], fontsize=7)
        mine = x[classes == c]
        if len(mine):
            _draw(ax, mine[0])
    return fig


MAX_CLASSES_DRAWN = 100  # a row per class: 1,000 classes took ~50 s to draw, into a figure no one can read


def _note_classes_left_out(fig, k: int) -> None:
    if k > MAX_CLASSES_DRAWN:
        fig.suptitle(f"the first {MAX_CLASSES_DRAWN} of {k} classes", fontsize=8)


def _draw(ax, img: torch.Tensor) -> None:
    if img.dim() <= 2:  # (C, L) signal, or a (D,) vector drawn as one curve
        for ch in img.reshape(-1, img.shape[-1]):
            ax.plot(ch.numpy(), lw=0.8)
        return
    show_image(ax, img.clamp(0, 1))


def show_image(ax, img: torch.Tensor) -> None:
    """Draw a (C, H, W) image in [0, 1]: gray for 1 channel, RGB from the first 3, and 2 channels as red and
    green (matplotlib has no 2-channel image: it raised TypeError after a whole run)."""
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        return
    if img.shape[0] == 2:
        img = torch.cat([img, img.new_zeros(1, *img.shape[1:])])
    ax.imshow(img[:3].permute(1, 2, 0).numpy())


def render_losses(losses: list[float], title: str = "") -> bytes:
    """PNG bytes of the loss per outer iteration."""
    fig, ax = new_figure((5, 3))
    if losses:
        ax.plot(range(1, len(losses) + 1), losses, lw=1)
    else:  # random, herding: chosen, not optimised (an empty pair of axes read as a failed run)
        ax.text(0.5, 0.5, "no outer iterations: the set was chosen, not optimised", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("outer iteration")
    ax.set_ylabel("matching loss")
    ax.set_title(title or "learning curve")
    return png_bytes(fig)

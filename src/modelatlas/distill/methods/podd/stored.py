"""Checks of a poster as stored in a result folder (layout in ``synthetic.json``, poster and grids in
``synthetic.safetensors``), so that a hand-edited folder fails naming the file and the key instead of deep in
:func:`~modelatlas.distill.methods.podd.method.expand` with a KeyError or a shape error."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

from modelatlas.distill.methods.podd import poster as P
from modelatlas.distill.synthetic import META_FILE, TENSORS_FILE, SyntheticSet
from modelatlas.errors import CheckpointError

_SIZES = ("height", "width", "crop_h", "crop_w", "n_x", "n_y", "rows", "cols", "refine")
_REQUIRED = tuple(f.name for f in fields(P.Layout) if f.default is MISSING)  # others have defaults (older files)
_MAX_CROP_VALUES = 2**31  # float32 values of all crops cut from a poster (8 GiB): beyond is an edited layout


def check_stored(syn: SyntheticSet, folder: Path) -> P.Layout:
    """The layout of the stored poster set ``syn`` loaded from ``folder``, with its tensors checked against it."""
    layout = _layout(syn.meta.get("poster"), folder / META_FILE)
    tensors, k = folder / TENSORS_FILE, syn.num_classes
    for key in ("poster", "class_grid"):
        if key not in syn.extras:
            raise CheckpointError(tensors, f"has no tensor 'extra.{key}'; a stored poster needs it")
    poster, grid = syn.extras["poster"], syn.extras["class_grid"]
    if poster.dim() != 3 or tuple(poster.shape[1:]) != (layout.height, layout.width):
        raise CheckpointError(tensors, f"extra.poster must be (C, {layout.height}, {layout.width}) as the layout "
                                       f"says, got {tuple(poster.shape)}")
    values = layout.n_x * layout.n_y * poster.shape[0] * layout.crop_h * layout.crop_w  # expanded crops
    if values > _MAX_CROP_VALUES:
        raise CheckpointError(folder / META_FILE, f"meta poster n_x x n_y = {layout.n_x} x {layout.n_y} crops would "
                                                  f"take {4 * values / 2**30:.0f} GiB to cut from the poster; the "
                                                  "layout was edited: run the distillation again")
    if tuple(grid.shape) != (layout.rows, layout.cols) or grid.dtype.is_floating_point or (
            grid.numel() and not 0 <= int(grid.min()) <= int(grid.max()) < k):
        raise CheckpointError(tensors, f"extra.class_grid must be ({layout.rows}, {layout.cols}) class indices "
                                       f"in [0, {k}), got shape {tuple(grid.shape)} of {grid.dtype}")
    cells = (layout.rows * layout.refine, layout.cols * layout.refine, k)
    labels = syn.extras.get("label_grid")
    if labels is not None and tuple(labels.shape) != cells:
        raise CheckpointError(tensors, f"extra.label_grid must be {cells}, got {tuple(labels.shape)}")
    return layout


def _layout(raw: object, path: Path) -> P.Layout:
    names = [f.name for f in fields(P.Layout)]
    if not isinstance(raw, dict):
        raise CheckpointError(path, f"meta poster must be an object (the layout: {', '.join(names)}), got {raw!r}")
    odd = sorted(set(_REQUIRED) - set(raw)) or sorted(set(raw) - set(names))
    if odd:
        what = "lacks" if odd[0] in _REQUIRED else "has the unknown key"
        raise CheckpointError(path, f"meta poster {what} {odd[0]!r}; its keys: {', '.join(names)}")
    bad = next((k for k in _SIZES if k in raw and (isinstance(raw[k], bool) or not isinstance(raw[k], int)
                                                  or raw[k] < 1)), None)
    if bad is not None:
        raise CheckpointError(path, f"meta poster {bad} must be an integer >= 1, got {raw[bad]!r}")
    odd = next((k for k in ("shrink", "temperature") if k in raw and (isinstance(raw[k], bool)
                                                                    or not isinstance(raw[k], (int, float)))), None)
    if odd is not None:
        raise CheckpointError(path, f"meta poster {odd} must be a number, got {raw[odd]!r}")
    if raw["crop_h"] > raw["height"] or raw["crop_w"] > raw["width"]:
        raise CheckpointError(path, f"meta poster crops ({raw['crop_h']} x {raw['crop_w']}) are larger than the "
                                    f"poster ({raw['height']} x {raw['width']})")
    return P.Layout(**raw)

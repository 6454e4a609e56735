"""``image-folder``: a class-per-subfolder tree of PNG/JPEG/PGM images, read with Pillow.

``root/<class>/*.png``; an image's content is read as one of :data:`READ_FORMATS` (never EPS), from memory.
Classes are the sorted subfolder names, in Unicode NFC form: a name macOS wrote decomposed (NFD, ``cafe`` +
combining accent) is the same class as one typed composed, so ``train/café`` and ``test/café`` are one class
however each was written. Two subfolders of one folder whose names differ only in that form are refused,
naming both: merging them silently could hide two sources mixed by mistake. If ``root/train`` and
``root/test`` exist they are the splits, otherwise one seeded permutation splits the images
(``test_fraction``). Hidden files and folders, and subfolders without images, are skipped. Images are
converted to grayscale (``channels=1``) or RGB (3) and resized to ``size`` x ``size`` (bilinear).
O(N * size^2) time and memory.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import torch

from modelatlas.config_types import fits
from modelatlas.data.registry import ArrayDataset, check_fraction, check_int, check_seed, register_dataset
from modelatlas.errors import CheckpointError, ConfigError, DatasetNotFoundError
from modelatlas.seeding import torch_generator

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp"}
# The formats an image's content is read as (Pillow opens a file by its content, not its name): the suffixes'
# formats and the raster formats a mislabelled download often is (GIF, WebP, TIFF). Never EPS: Pillow renders it by
# running Ghostscript on the file; nor the many other formats Pillow has plugins for.
READ_FORMATS = ("PNG", "JPEG", "PPM", "BMP", "GIF", "WEBP", "TIFF")


# Pillow's 16-bit grayscale modes: a PGM with maxval > 255 opens as "I" with samples already rescaled from
# 0..maxval to 0..65535 (Pillow >= 9.1), a 16-bit PNG as "I;16". convert("L") would clip them at 255.
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L"}


def _read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """The image at ``path``, read whole first: a chunk length past the file's end made Pillow read (allocate) what
    it claims from a file (4 GiB for a PNG of 2 KB), and reads from memory stop at its end."""
    import io

    from PIL import Image, UnidentifiedImageError

    Image.init()  # every plugin registered: Image.OPEN lists the formats this Pillow reads
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data), formats=[f for f in READ_FORMATS if f in Image.OPEN]) as im:
            _check_png_size(im, len(data), path)
            if im.mode in _WIDE_GRAY_MODES:
                return _read_wide_gray(im, size, channels)
            if im.mode == "P" and "transparency" in im.info:  # through RGBA, as Pillow asks (it warned on every
                im = im.convert("RGBA")  # such image); the same colours, the alpha dropped below as before
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except UnidentifiedImageError:  # its message names the in-memory copy (<_io.BytesIO object at 0x...>)
        raise CheckpointError(path, f"not a readable image: its content is none of {', '.join(READ_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow: SyntaxError for a broken PNG chunk, ValueError a PGM
        raise CheckpointError(path, f"not a readable image ({e})") from None  # header
    except Image.DecompressionBombError as e:  # Pillow refuses huge images before decoding (not an OSError)
        raise CheckpointError(path, f"too large to read safely ({e}); shrink it or move it out of the folder") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)  # (C, H, W)


def _check_png_size(im, nbytes: int, path: Path) -> None:
    """Refuse a PNG whose header claims more pixel rows than its ``nbytes`` can inflate to: deflate turns a byte
    into at most 1032 (a 258-byte match costs 2 bits at least), and a row holds a filter byte and a bit per pixel
    at least. A 164-byte PNG claiming 5 x 33,554,438 pixels (within Pillow's limit) was decoded into 1.3 GB."""
    width, height = im.size
    if im.format == "PNG" and height * (1 + (width + 7) // 8) > 1032 * nbytes:
        raise CheckpointError(path, f"its header claims {width} x {height} pixels, more than its {nbytes} bytes can "
                                    "hold (a damaged PNG)")


def _read_wide_gray(im, size: int, channels: int) -> np.ndarray:
    """A 16-bit grayscale image scaled to [0, 1] by its full range, then resized in float (mode "F") so no
    precision is lost to 8 bits; gray is repeated for RGB."""
    from PIL import Image

    gray = np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
    arr = np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return np.repeat(arr[None], channels, axis=0)  # (C, H, W)


def _is_image(f: Path) -> bool:
    """An image file by suffix; hidden files (macOS ``._x.png`` resource forks) are not images."""
    return f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()


def _class_dirs(folder: Path) -> dict[str, Path]:
    """NFC class name -> its subfolder of ``folder``. Hidden folders (``.ipynb_checkpoints``) and folders without
    images are not classes; two subfolders whose names are one NFC name are refused (see the module doc)."""
    dirs: dict[str, Path] = {}
    for d in sorted(folder.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and any(_is_image(x) for x in d.iterdir()):
            name = unicodedata.normalize("NFC", d.name)
            if name in dirs:  # with ascii(): the two spellings print alike, their escapes do not
                raise CheckpointError(folder, f"class folders {name} ({ascii(dirs[name].name)}) and {name} "
                                              f"({ascii(d.name)}) are one name written two ways (Unicode NFC and "
                                              "NFD, as macOS may write it); move the images of one into the other")
            dirs[name] = d
    return dirs


def _classes(*folders: Path) -> list[str]:
    """Sorted class names across ``folders``: train and test share one label numbering even when a split lacks a
    class, or writes its name in another Unicode form."""
    return sorted({name for f in folders for name in _class_dirs(f)})


def _scan(folder: Path, classes: list[str]) -> tuple[list[Path], list[int], list[str]]:
    files, labels = [], []
    dirs = _class_dirs(folder)
    for i, c in enumerate(classes):
        if c not in dirs:
            continue
        for f in sorted(dirs[c].iterdir()):
            if _is_image(f):
                files.append(f)
                labels.append(i)
    return files, labels, classes


def _no_images(root: Path, folder: Path) -> DatasetNotFoundError:
    """The error for a folder without class images, naming folders that hold class folders one level deeper
    (``train/`` + ``val/``: a split layout needs ``train/`` and ``test/``)."""
    deeper = [] if folder != root else sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _classes(d))
    hint = (f"; {', '.join(f'{name}/' for name in deeper)} hold class folders, but a split layout needs both "
            f"{root / 'train'}/ and {root / 'test'}/" if deeper else "")
    loose = sum(1 for f in folder.iterdir() if _is_image(f))
    if loose and not hint:  # the user gave one class's folder (or a folder of unsorted images)
        hint = (f"; it holds {loose} image(s) itself, which belong to no class: pass the folder above it, with the "
                "images of each class in a subfolder of their own")
    return DatasetNotFoundError(f"image-folder: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under "
                                f"{folder}/<class>/{hint}")


def load_image_folder(split: str, root: str | Path | None = None, size: int = 32, channels: int = 3,
                      test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """Images under ``root/<class>/`` as (N, channels, size, size) float32 in [0, 1]."""
    if root is None:
        raise DatasetNotFoundError("image-folder: pass --data-root DIR (root=): a folder with one subfolder of images "
                                   "per class")
    if not fits(channels, int) or channels not in (1, 3):  # True was 1; 3.0 failed
        raise ConfigError(f"dataset 'image-folder': channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    check_int("image-folder", "size", size, minimum=1)
    check_fraction("image-folder", "test_fraction", test_fraction, allow_zero=True)
    check_seed("image-folder", seed)
    root = Path(root).expanduser()  # "~/data": not a folder named ~
    if not root.is_dir():
        raise DatasetNotFoundError(f"image-folder: {root} is not a folder")
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    folders = [root / "train", root / "test"] if split_dirs else [root]
    folder = root / split if split_dirs else root
    files, labels, classes = _scan(folder, _classes(*folders))
    if not files:  # named: with train/ and test/ an empty split is not an empty root
        raise _no_images(root, folder)
    if not split_dirs:
        perm = torch.randperm(len(files), generator=torch_generator(seed)).tolist()
        n_test = int(round(len(files) * test_fraction))
        keep = perm[:n_test] if split == "test" else perm[n_test:]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    x = np.stack([_read_image(f, size, channels) for f in files]) if files else np.zeros((0, channels, size, size))
    if len(classes) == 1:  # every model trained on it is 100 % right: a distillation scored 100 %, silently
        raise ConfigError(f"image-folder: {root} holds one class folder ({classes[0]}/): a classifier needs at "
                          "least 2 classes; put each class's images in a subfolder of its own")
    return ArrayDataset("image-folder", torch.tensor(x, dtype=torch.float32), torch.tensor(labels, dtype=torch.long),
                        classes, {"source": str(root)})


register_dataset("image-folder", load_image_folder, "class-per-subfolder PNG/JPEG/PGM images (root=, size=, channels=)",
                 lambda: "needs its folder: --data-root DIR (root= in Python)")


def check_out_outside_images(out: str | Path, dataset, root: str | Path | None, flag: str = "--out") -> None:
    """Refuse an output folder inside the image folder being read (``dataset`` "image-folder", ``root`` its
    folder): the figures written there (PNG) made a class of that folder's name in every later run on the data."""
    if dataset != "image-folder" or root is None:
        return
    root = Path(root).expanduser().resolve()  # as the loader reads it: '~/data' is $HOME/data, not ./~/data
    if Path(out).resolve().is_relative_to(root):
        raise ConfigError(f"{flag} {out} is inside --data-root {root}: its PNG figures would be read as a class of "
                          "images by every later run on that data; choose an output folder outside it")

import numpy as np
import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.data.transforms import ZCA, Standardize, from_state_dict, make_transform
from modelatlas.errors import ConfigError, DatasetNotFoundError


def make_image_tree(root):
    from PIL import Image

    for c, value in (("cat", 30), ("dog", 220)):
        (root / c).mkdir(parents=True)
        for i in range(5):
            arr = np.full((10, 12, 3), value + i, np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
        Image.fromarray(arr[..., 0]).save(root / c / "g.pgm")
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(tmp_path, channels):
    root = make_image_tree(tmp_path)
    tr = load_dataset("image-folder", "train", root=root, size=8, channels=channels)
    te = load_dataset("image-folder", "test", root=root, size=8, channels=channels)
    assert tr.x.shape[1:] == (channels, 8, 8) and len(tr) + len(te) == 12 and tr.classes == ["cat", "dog"]
    dog = tr.x[tr.y == 1]
    assert float(dog.min()) > 0.8


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_dataset("image-folder", root=tmp_path)
    with pytest.raises(ConfigError, match="channels must be 1"):
        load_dataset("image-folder", root=tmp_path, channels=2)


def test_standardize_roundtrip_and_state():
    x = torch.rand(50, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    t = Standardize().fit(x)
    z = t.transform(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(t.inverse(z), x, atol=1e-5)
    t2 = Standardize.from_state_dict(t.state_dict())
    assert torch.allclose(t2.transform(x), z)


def test_zca_whitens_and_inverts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, 3, 3, generator=g) @ torch.randn(3, 3, generator=g)
    t = ZCA(regularization=1e-6).fit(x)
    flat = t.transform(x).reshape(400, -1)
    cov = flat.T @ flat / 399
    assert torch.allclose(cov, torch.eye(18), atol=1e-2)
    t01 = ZCA().fit(x)
    assert torch.allclose(t01.inverse(t01.transform(x)), x, atol=1e-4)
    again = from_state_dict("zca", t01.state_dict())
    assert torch.allclose(again.transform(x), t01.transform(x)) and again.regularization == pytest.approx(0.1)


def test_transform_errors():
    with pytest.raises(ConfigError, match="transform must be one of"):
        make_transform("pca")
    with pytest.raises(ConfigError, match="regularization must be > 0"):
        ZCA(regularization=0)


def make_split_tree(root, splits):
    """root/<split>/<class>/0.png, one image per class, grey level = 40 * class index in ``splits[split]``."""
    from PIL import Image

    for split, classes in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.fromarray(np.full((4, 4), 40 * ["cat", "dog", "fish"].index(c), np.uint8)).save(root / split / c / "0.png")
    return root


def test_image_folder_splits_share_class_numbering(tmp_path):
    root = make_split_tree(tmp_path, {"train": ["cat", "dog", "fish"], "test": ["cat", "fish"]})  # no test dog
    tr = load_dataset("image-folder", "train", root=root, size=4, channels=1)
    te = load_dataset("image-folder", "test", root=root, size=4, channels=1)
    assert tr.classes == te.classes == ["cat", "dog", "fish"]
    assert te.y.tolist() == [0, 2]  # fish is class 2 in both splits


def test_image_folder_hidden_folders_are_not_classes(tmp_path):
    root = make_image_tree(tmp_path)
    (root / ".ipynb_checkpoints").mkdir()
    ds = load_dataset("image-folder", "train", root=root, size=4, channels=1)
    assert ds.classes == ["cat", "dog"] and float(ds.x[ds.y == 1].min()) > 0.8


def make_pgm16(path, rows, maxval):
    """A binary (P5) PGM with 2-byte big-endian samples, as netpbm writes when maxval > 255."""
    arr = np.asarray(rows, dtype=">u2")
    path.write_bytes(f"P5\n{arr.shape[1]} {arr.shape[0]}\n{maxval}\n".encode() + arr.tobytes())
    return path


@pytest.mark.parametrize("maxval", [1000, 4095, 65535])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pgm_is_scaled_by_maxval_not_clipped(tmp_path, maxval, channels):
    rows = [[0, maxval // 4], [maxval // 2, maxval]]
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        make_pgm16(tmp_path / c / "x.pgm", rows, maxval)
    ds = load_dataset("image-folder", "train", root=tmp_path, size=2, channels=channels, test_fraction=0.0)
    expected = torch.tensor(rows, dtype=torch.float32) / maxval  # same size: no resampling
    assert ds.x.shape == (2, channels, 2, 2)
    assert torch.allclose(ds.x[0], expected.expand(channels, 2, 2), atol=1e-4)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    rows = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(rows).save(tmp_path / c / "x.png")
    ds = load_dataset("image-folder", "train", root=tmp_path, size=2, channels=1, test_fraction=0.0)
    assert torch.allclose(ds.x[0, 0], torch.from_numpy(rows.astype(np.float32)) / 65535, atol=1e-4)


def test_image_over_pillows_size_limit_is_a_named_error(tmp_path, monkeypatch):
    """Pillow's DecompressionBombError is no OSError: it once escaped as a traceback."""
    from PIL import Image

    from modelatlas.errors import CheckpointError

    root = make_image_tree(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 10x12 images: over twice the limit, as a 20k x 20k photo
    with pytest.raises(CheckpointError, match=r"/(cat|dog)/.*: too large to read safely.*shrink it or move it out"):
        load_dataset("image-folder", "train", root=root, size=4, channels=1, test_fraction=0)


def test_empty_test_split_folder_is_named(tmp_path):
    """With train/ and test/, an empty test/ was reported as "no images under ROOT/<class>/" (ROOT has some)."""
    root = make_split_tree(tmp_path, {"train": ["cat", "dog"]})
    (root / "test").mkdir()
    assert len(load_dataset("image-folder", "train", root=root, size=4, channels=1)) == 2
    with pytest.raises(DatasetNotFoundError, match=r"no images .* under \S+/test/<class>/$"):
        load_dataset("image-folder", "test", root=root, size=4, channels=1)


def test_train_and_val_folders_get_a_split_layout_hint(tmp_path):
    """ROOT/train/ + ROOT/val/ (no test/) read as an empty class-per-folder root: "no images under ROOT/<class>/"
    without saying why, though every image sits one level deeper."""
    root = make_split_tree(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    with pytest.raises(DatasetNotFoundError, match=r"train/, val/ hold class folders, but a split layout needs both "
                                                   r"\S+/train/ and \S+/test/$"):
        load_dataset("image-folder", "train", root=root, size=4, channels=1)


def _png_with_short_idat(path):
    """A PNG whose IDAT chunk claims 5 bytes: Pillow reads on into a garbage chunk type and raises SyntaxError."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[raw.find(b"IDAT") - 4:raw.find(b"IDAT")] = (5).to_bytes(4, "big")  # the chunk's length
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name,write", [("0.png", _png_with_short_idat),
                                        ("0.pgm", lambda p: p.write_bytes(b"P5\n2 x\n255\n\0\0\0\0"))])
def test_a_corrupt_image_is_named_not_a_traceback(tmp_path, name, write):
    """A damaged PNG raised SyntaxError and a PGM with a bad header ValueError: tracebacks, not one line."""
    from modelatlas.errors import CheckpointError

    (tmp_path / "cat").mkdir()
    write(tmp_path / "cat" / name)
    with pytest.raises(CheckpointError, match=f"cat/{name}: not a readable image"):
        load_dataset("image-folder", "train", root=tmp_path, test_fraction=0)


def test_a_png_chunk_length_past_the_file_end_allocates_nothing(tmp_path, make_two_class_images):
    """Fuzzer case 109 of image-folder: a 16-bit PNG whose IDAT length says 2**32 - 1 made Pillow read (and
    allocate) 4 GiB from the file at load_end: a MemoryError traceback under a memory limit."""
    import struct

    from PIL import Image
    from tests.weights.fuzz_damage import check_limits

    root = make_two_class_images(tmp_path)
    path = root / "cat" / "w.png"
    Image.fromarray(np.full((6, 5), 1000, np.uint16)).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">I", data, 33, 2**32 - 1)  # the chunk after IHDR (8 + 25 bytes)
    path.write_bytes(bytes(data))
    with check_limits(5.0, 1 << 30):  # Pillow reads the pixels it has (from memory, which stops at its end)
        ds = load_dataset("image-folder", "train", root=root, size=4, test_fraction=0.0)
    assert ds.x.shape == (9, 3, 4, 4)  # and the damaged image's pixels are its own (the others are 8-bit grays)
    assert int(torch.isclose(ds.x.flatten(1), torch.tensor(1000 / 65535)).all(dim=1).sum()) == 1


def test_an_eps_named_png_is_refused_without_running_ghostscript(tmp_path, make_two_class_images, monkeypatch):
    """Pillow opens a file by its content: an EPS file named cat/0.png was read as EPS, whose load runs
    Ghostscript (a PostScript interpreter) on the file where it is installed. Only raster formats are read; a
    GIF named .png (a mislabelled download) still is."""
    import io

    from PIL import EpsImagePlugin, Image

    from modelatlas.errors import CheckpointError

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append(args))
    root = make_two_class_images(tmp_path)
    Image.fromarray(np.full((6, 5), 90, np.uint8)).save(root / "dog" / "0.png", "GIF")
    eps = io.BytesIO()
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(eps, "EPS")
    (root / "cat" / "0.png").write_bytes(eps.getvalue())
    refused = f"{root / 'cat' / '0.png'}: not a readable image: its content is none of PNG, JPEG, PPM, BMP, GIF"
    with pytest.raises(CheckpointError, match=refused):
        load_dataset("image-folder", "train", root=root, size=4, test_fraction=0.0)
    assert not ran
    (root / "cat" / "0.png").unlink()
    assert len(load_dataset("image-folder", "train", root=root, size=4, test_fraction=0.0)) == 7


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 168M pixels: over its warning limit
def test_a_png_claiming_more_pixels_than_its_bytes_can_hold_is_refused_before_decoding(tmp_path, make_two_class_images):
    """Fuzzer case 7744 of image-folder: a 164-byte RGB PNG whose IHDR height said 33,554,438 (one bit flipped,
    the CRC right) is within Pillow's limit (5 x 33,554,438 pixels): it was decoded into 1.3 GB (a MemoryError
    under a 1 GiB limit; else 2 s and an image of zeros). Deflate inflates a byte to at most 1032."""
    import struct
    import zlib

    from PIL import Image
    from tests.weights.fuzz_damage import check_limits

    from modelatlas.errors import CheckpointError

    root = make_two_class_images(tmp_path)
    path = root / "cat" / "0.png"
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">I", data, 20, 33554438)  # IHDR height; then the chunk's CRC made right
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    claims = f"{path}: its header claims 5 x 33554438 pixels, more than its {len(data)} bytes can hold"
    with check_limits(5.0, 1 << 30), pytest.raises(CheckpointError, match=claims):
        load_dataset("image-folder", "train", root=root, size=4, test_fraction=0.0)


@pytest.mark.parametrize("channels", [1, 3])
def test_palette_pngs_with_transparency_load_without_a_warning_in_their_colours(tmp_path, channels):
    """Pillow warned on every palette PNG with transparency bytes ("should be converted to RGBA images")."""
    import warnings

    from PIL import Image

    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756  # black, red, green, blue
    idx = np.array([[0, 1], [2, 3]], np.uint8)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        im = Image.fromarray(idx, "P")
        im.putpalette(palette)
        im.save(tmp_path / c / "x.png", transparency=b"\x00\x80\xff\xff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("image-folder", "train", root=tmp_path, size=2, channels=channels, test_fraction=0.0)
    rgb = torch.tensor([[[0, 255], [0, 0]], [[0, 0], [255, 0]], [[0, 0], [0, 255]]], dtype=torch.float32) / 255
    want = rgb if channels == 3 else (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]  # (C, 2, 2)
    assert torch.allclose(ds.x[0], want, atol=1 / 255)

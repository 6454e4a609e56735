import gzip
import struct

import numpy as np
import pytest

from modelatlas.data import load_dataset
from modelatlas.data.idx import IDXError, read_idx
from modelatlas.errors import DatasetNotFoundError


def make_idx(path, arr, code=0x08, gz=False):
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(">u1").tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_fashion_folder(root, n=6, gz=True):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        suffix = ".gz" if gz else ""
        make_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz=gz)
        make_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz=gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    out = read_idx(make_idx(tmp_path / "a.idx", arr, gz=gz))
    assert out.shape == (2, 3, 4) and (out == arr).all()


def test_read_idx_rejects_bad_header(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(IDXError, match="bad: not an IDX file"):
        read_idx(bad)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(IDXError, match=r"trunc: header says shape \(10,\)"):
        read_idx(trunc)
    code = tmp_path / "code"
    code.write_bytes(bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(IDXError, match="unknown IDX data type code 0x42"):
        read_idx(code)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_from_root(tmp_path, gz):
    ds = load_dataset("fashion-mnist", "test", root=make_fashion_folder(tmp_path, gz=gz))
    assert ds.x.shape == (6, 1, 28, 28) and ds.classes[9] == "Ankle boot"
    assert 0 <= float(ds.x.min()) and float(ds.x.max()) <= 1 and ds.y.tolist() == [0, 1, 2, 3, 4, 5]


def test_fashion_env_and_missing(tmp_path, monkeypatch):
    (tmp_path / "f").mkdir()
    monkeypatch.setenv("ATLAS_FASHION_MNIST", str(make_fashion_folder(tmp_path / "f")))
    assert len(load_dataset("fashion-mnist", "train")) == 6
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist.*root="):
        load_dataset("fashion-mnist", "train", root=tmp_path / "empty")


def test_read_idx_corrupt_deflate_names_the_file(tmp_path):
    good = gzip.compress(make_idx(tmp_path / "raw", np.arange(256)).read_bytes())
    bad = tmp_path / "bad.gz"
    bad.write_bytes(good[:10] + b"\xff" * 8 + good[18:])  # gzip header intact, deflate stream garbage
    with pytest.raises(IDXError, match=r"bad\.gz: corrupt gzip stream"):
        read_idx(bad)


def make_idx_typed(path, arr, code, dtype):
    """An IDX file of any type code (``make_idx`` writes bytes)."""
    path.write_bytes(bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(dtype).tobytes())
    return path


@pytest.mark.parametrize("images,message", [
    (lambda p: make_idx(p, np.zeros((6, 0, 28))), r"expected images of shape \(N, H, W\) with H, W >= 1, got \(6, 0, 28\)"),
    (lambda p: make_idx_typed(p, np.full((6, 4, 4), 1000), 0x0C, ">i4"), r"expected uint8 pixels.*got int32"),
    (lambda p: make_idx_typed(p, np.full((6, 4, 4), 0.5), 0x0D, ">f4"), r"expected uint8 pixels.*got float32"),
])
def test_fashion_images_that_are_not_uint8_pixels_are_refused(tmp_path, images, message):
    """Pixels of another type were divided by 255 all the same (an int32 file gave inputs up to ~1000); images
    0 pixels high loaded, and distillation then failed with "math domain error"."""
    root = make_fashion_folder(tmp_path, gz=False)
    images(root / "t10k-images-idx3-ubyte")
    with pytest.raises(IDXError, match="t10k-images-idx3-ubyte: " + message):
        load_dataset("fashion-mnist", "test", root=root)


@pytest.mark.parametrize("labels,message", [
    (lambda p: make_idx(p, np.arange(6) + 5), r"labels must be class indices 0\.\.9, got 5\.\.10"),
    (lambda p: make_idx_typed(p, np.arange(6) - 1, 0x09, ">i1"), r"labels must be class indices 0\.\.9, got -1\.\.4"),
    (lambda p: make_idx_typed(p, np.arange(6) + 0.5, 0x0D, ">f4"), "expected integer labels, got float32"),
])
def test_fashion_labels_out_of_range_name_the_file(tmp_path, labels, message):
    """Labels past the classes were refused without naming the file; float labels were truncated silently."""
    root = make_fashion_folder(tmp_path, gz=False)
    labels(root / "t10k-labels-idx1-ubyte")
    with pytest.raises(IDXError, match="t10k-labels-idx1-ubyte: " + message):
        load_dataset("fashion-mnist", "test", root=root)


def test_header_whose_size_overflows_64_bits_is_refused(tmp_path):
    """65536**4 bytes wrapped to 0 in np.prod: the empty file 'matched' and reshape raised a ValueError."""
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 8, 4]) + struct.pack(">4I", 65536, 65536, 65536, 65536))
    with pytest.raises(IDXError, match=r"huge: header says shape \(65536, 65536, 65536, 65536\) \(18446744073709551616"):
        read_idx(path)


def test_gzip_that_inflates_far_past_its_header_is_refused_without_inflating_it(tmp_path):
    """The whole stream was decompressed before the header was checked: 128 KiB of gzip claiming 4 bytes of
    data took 128 MiB of memory (a few MB of gzip: gigabytes) before 'header says ...'."""
    import tracemalloc
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    parts = [comp.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 4))]
    block = bytes(1 << 20)
    parts += [comp.compress(block) for _ in range(128)] + [comp.flush()]
    path = tmp_path / "bomb.gz"
    path.write_bytes(b"".join(parts))
    del block, parts
    tracemalloc.start()
    try:
        with pytest.raises(IDXError, match=r"bomb\.gz: header says shape \(4,\) \(4 data bytes\) but the file has more"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    huge = tmp_path / "huge.gz"  # and a header claiming 2**64 bytes is not a MemoryError
    huge.write_bytes(gzip.compress(bytes([0, 0, 8, 4]) + struct.pack(">4I", 65536, 65536, 65536, 65536)))
    with pytest.raises(IDXError, match=r"huge\.gz: header says shape \(65536, 65536, 65536, 65536\)"):
        read_idx(huge)


def test_fashion_root_that_is_a_file_says_to_pass_its_folder(tmp_path):
    """--data-root .../train-images-idx3-ubyte.gz said '.../train-images-idx3-ubyte.gz/train-images-idx3-ubyte[.gz]
    not found; install it with apt-get' although the file was right there."""
    root = make_fashion_folder(tmp_path)
    one = root / "train-images-idx3-ubyte.gz"
    with pytest.raises(DatasetNotFoundError, match=f"fashion-mnist: {one} is a file, not a folder; pass the folder "
                                                   f"that holds the four IDX files \\({root}\\)"):
        load_dataset("fashion-mnist", "train", root=one)


def test_a_header_of_zero_dimensions_says_so(tmp_path):
    """A header declaring 0 dimensions was reported as 'truncated header (4 bytes for 0 dimensions)'."""
    path = tmp_path / "zero-dims-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 0]) + b"\x00" * 8)
    with pytest.raises(IDXError, match=r"zero-dims-idx1-ubyte: the header declares 0 dimensions \(an IDX array has "
                                       r"at least 1\)"):
        read_idx(path)


def test_images_that_do_not_match_the_labels_in_number_name_both_files(tmp_path):
    """Fuzzer case 64 of idx: an images header saying (1, 1, 4704) (as many values as (6, 28, 28)) was reported
    as '<labels>: expected 1 labels, got shape (6,)', naming only the labels file, which was right."""
    root = make_fashion_folder(tmp_path, gz=False)
    make_idx(root / "train-images-idx3-ubyte", np.zeros((1, 1, 4704)))
    with pytest.raises(IDXError, match=r"train-labels-idx1-ubyte: expected 1 labels \(as many as the images in "
                                       rf"{root / 'train-images-idx3-ubyte'}\), got shape \(6,\)"):
        load_dataset("fashion-mnist", "train", root=root)


@pytest.mark.parametrize("gz", [True, False])
def test_a_folder_in_place_of_an_idx_file_says_so(tmp_path, gz):
    """Fuzzer case 1 of idx-gz: a folder named train-labels-idx1-ubyte.gz was reported as '...-ubyte[.gz] not
    found; install it with apt-get', although the name was there."""
    root = make_fashion_folder(tmp_path, gz=gz)
    labels = root / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))
    labels.unlink()
    labels.mkdir()
    with pytest.raises(IDXError, match=f"{labels}: is a folder, not an IDX file"):
        load_dataset("fashion-mnist", "train", root=root)

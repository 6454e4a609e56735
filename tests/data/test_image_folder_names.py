"""Class folder names the file system hands back in another Unicode form, or as bytes that are not UTF-8."""

import os
import unicodedata

import numpy as np
import pytest

from modelatlas.data import load_dataset
from modelatlas.errors import CheckpointError

NFC = unicodedata.normalize("NFC", "caf\u00e9")  # é as one code point
NFD = unicodedata.normalize("NFD", "caf\u00e9")  # e + combining acute accent, as macOS writes it


def make_class(folder, name, value, n=2):
    """``folder/name/`` with ``n`` 4x4 gray PNGs of brightness ``value``; skips the test when the file system
    cannot hold ``name`` as a folder of its own (it normalises names, or refuses bytes that are not UTF-8)."""
    from PIL import Image

    try:
        (folder / name).mkdir(parents=True)
    except (FileExistsError, UnicodeEncodeError, OSError) as e:
        pytest.skip(f"the file system does not keep the name {ascii(name)} as given ({e})")
    if name not in os.listdir(folder):
        pytest.skip(f"the file system changed the name {ascii(name)}")
    for i in range(n):
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(folder / name / f"{i}.png")


def test_class_names_are_nfc_and_one_class_across_splits(tmp_path):
    make_class(tmp_path / "train", NFD, 200)
    make_class(tmp_path / "train", "zebra", 10)
    make_class(tmp_path / "test", NFC, 200, n=1)
    make_class(tmp_path / "test", "zebra", 10, n=1)
    train = load_dataset("image-folder", "train", root=tmp_path, size=4, channels=1)
    test = load_dataset("image-folder", "test", root=tmp_path, size=4, channels=1)
    assert train.classes == test.classes == [NFC, "zebra"]  # two classes, not three; the name saved is NFC
    assert train.y.tolist() == [0, 0, 1, 1] and test.y.tolist() == [0, 1]
    assert float(train.x[0].min()) == pytest.approx(200 / 255)  # the NFD folder's images under the NFC name


def test_two_folders_of_one_name_in_two_forms_are_refused_naming_both(tmp_path):
    make_class(tmp_path, NFC, 200)
    make_class(tmp_path, NFD, 100)
    with pytest.raises(CheckpointError) as info:
        load_dataset("image-folder", "train", root=tmp_path, size=4, channels=1)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: class folders ") and "\n" not in message
    assert "'caf\\xe9'" in message and "'cafe\\u0301'" in message  # told apart: both print as café
    assert f"class folders {NFC} ('cafe\\u0301') and {NFC} ('caf\\xe9') are one name" in message  # sorted; readable


def test_a_class_folder_named_by_bytes_that_are_not_utf8(tmp_path):
    name = os.fsdecode(b"m\xe9")  # Latin-1 é: held as the surrogate escape \udce9
    make_class(tmp_path, name, 200)
    make_class(tmp_path, "zebra", 10)
    data = load_dataset("image-folder", "train", root=tmp_path, size=4, channels=1, test_fraction=0.0)
    assert data.classes == [name, "zebra"] and data.y.tolist() == [0, 0, 1, 1]

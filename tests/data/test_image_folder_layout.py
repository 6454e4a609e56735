"""image-folder: layouts a user's own folder may have that are no class-per-folder dataset."""

import numpy as np
import pytest
from PIL import Image
from tests.distill.test_cli_api import check_image_folder_refused

from modelatlas.data import load_dataset
from modelatlas.errors import ConfigError, DatasetNotFoundError


def make_images(folder, n=4):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(folder / f"{i}.png")


def test_a_folder_of_one_class_is_refused_naming_it(tmp_path):
    """One class folder (all of a user's images in one subfolder) was distilled and scored 100 %: every net
    trained on one class is always right."""
    make_images(tmp_path / "imgs" / "photos")
    with pytest.raises(ConfigError, match=r"image-folder: .*imgs holds one class folder \(photos/\): a classifier "
                                          r"needs at least 2 classes; put each class's images in a subfolder"):
        load_dataset("image-folder", "train", root=tmp_path / "imgs")


def test_cli_distill_on_one_class_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    make_images(tmp_path / "imgs" / "photos")
    check_image_folder_refused(tmp_path, capsys, monkeypatch, "holds one class folder (photos/)")


def test_two_classes_still_load(tmp_path, make_two_class_images):
    ds = load_dataset("image-folder", "train", root=make_two_class_images(tmp_path / "imgs"), test_fraction=0.0)
    assert ds.classes == ["cat", "dog"] and sorted(ds.y.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_class_folder_given_as_the_root_says_to_pass_the_folder_above(tmp_path):
    """--data-root imgs/cat (images directly inside) said only 'no images under imgs/cat/<class>/'."""
    make_images(tmp_path / "imgs" / "cat", n=3)
    with pytest.raises(DatasetNotFoundError, match=r"no images .* under .*imgs/cat/<class>/; it holds 3 image\(s\) "
                                                   r"itself, which belong to no class: pass the folder above it"):
        load_dataset("image-folder", "train", root=tmp_path / "imgs" / "cat")

"""check_out_outside_images: an output folder inside the image folder read is refused, however the root is written."""

import pytest

from modelatlas.data.image_folder import check_out_outside_images
from modelatlas.errors import ConfigError


def test_out_inside_a_root_written_with_a_tilde_is_refused(tmp_path, monkeypatch):
    """--data-root=~/data (no shell expands a tilde after '=') was read from $HOME/data by the loader but
    compared as the folder './~/data': --out ~/data/att was let through, and its PNG became a class."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=r"--out .*data/att is inside --data-root .*data: "):
        check_out_outside_images(tmp_path / "data" / "att", "image-folder", "~/data")
    check_out_outside_images(tmp_path / "att", "image-folder", "~/data")  # beside it: fine

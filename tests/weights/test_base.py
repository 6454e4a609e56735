import os

import pytest

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import utf8_path


def test_utf8_path_is_the_path_itself_when_it_is_utf8(tmp_path):
    p = tmp_path / "caf\u00e9.bin"
    p.write_bytes(b"w")
    with utf8_path(p) as name:
        assert name == str(p)


def test_utf8_path_names_a_file_whose_name_is_not_utf8_by_its_descriptor(tmp_path, non_utf8_name):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd on this system")
    p = tmp_path / non_utf8_name
    p.write_bytes(b"weights")
    with utf8_path(p) as name:
        assert name.startswith("/proc/self/fd/") and name.isascii()
        with open(name, "rb") as f:
            assert f.read() == b"weights"
        fd = int(name.rsplit("/", 1)[1])
    with pytest.raises(OSError):  # the descriptor opened for it is closed again
        os.fstat(fd)


def test_utf8_path_without_proc_says_to_rename(tmp_path, non_utf8_name, monkeypatch):
    p = tmp_path / non_utf8_name
    p.write_bytes(b"weights")
    monkeypatch.setattr(os.path, "isdir", lambda path: False)  # a system without /proc/self/fd
    with pytest.raises(CheckpointError, match=r"not valid UTF-8.*rename the file") as info:
        with utf8_path(p):
            pass
    assert info.value.path == p

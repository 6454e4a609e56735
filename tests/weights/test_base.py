import os

import pytest
import torch

from modelatlas.errors import CheckpointError
from modelatlas.weights.base import Checkpoint, TensorInfo, utf8_path


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


class FolderReader(Checkpoint):
    """A plugin's reader of a folder model (no files() of its own): the default lists the folder's files."""

    def _infos(self):
        return []

    def _read(self, name):
        raise AssertionError("not read")


def test_a_folder_model_is_the_size_of_the_files_directly_in_it(tmp_path):
    """Its files' bytes, links followed; not its sub-folders (4,096 bytes each) or what they hold."""
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "w.bin").write_bytes(b"x" * 10)
    (tmp_path / "m" / "sub" / "other.bin").write_bytes(b"x" * 100)
    (tmp_path / "blob").write_bytes(b"x" * 7)
    (tmp_path / "m" / "link.bin").symlink_to(tmp_path / "blob")
    ck = FolderReader(tmp_path / "m")
    assert ck.files() == [tmp_path / "m" / "link.bin", tmp_path / "m" / "w.bin"] and ck.size_on_disk() == 17
    assert FolderReader(tmp_path / "blob").files() == [tmp_path / "blob"]


def test_a_file_gone_since_opening_is_a_checkpoint_error_naming_it(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    ck = FolderReader(tmp_path / "w.bin")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(CheckpointError, match=r"w\.bin: cannot stat .*w\.bin: No such file"):
        ck.size_on_disk()


class MadeCheckpoint(Checkpoint):
    """Tensors held in memory: only the interface's defaults at work."""

    def __init__(self, tensors):
        super().__init__("made", name="made")
        self._tensors = tensors

    def _infos(self):
        return [TensorInfo(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in self._tensors.items()]

    def _read(self, name):
        return self._tensors[name]


def test_read_rows_by_default_reads_the_tensor_and_takes_its_rows():
    ck = MadeCheckpoint({"a": torch.arange(24.0).reshape(2, 3, 4), "s": torch.tensor(5.0)})
    assert ck.read_rows("a", torch.tensor([4, 1])).tolist() == [[16.0, 17, 18, 19], [4, 5, 6, 7]]  # of (6, 4)
    assert ck.read_rows("s", torch.tensor([0])).tolist() == [[5.0]]
    assert ck.compared_rows("a") is None  # requantized_match / grid_position take the whole tensor

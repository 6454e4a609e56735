import json
import os

import pytest
import torch

from modelatlas.atomic import (
    atomic_save_tensors,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_tensors,
)


def test_atomic_write_json_roundtrip(tmp_path):
    p = atomic_write_json(tmp_path / "a" / "b.json", {"x": 1, "t": torch.tensor([1, 2])})
    assert json.loads(p.read_text()) == {"x": 1, "t": [1, 2]}


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_save_tensors(tmp_path):
    from safetensors.torch import load_file

    p = atomic_save_tensors(tmp_path / "w.safetensors", {"a": torch.arange(6).view(2, 3).t()})
    assert torch.equal(load_file(p)["a"], torch.arange(6).view(2, 3).t())


def test_read_tensors_round_trip_and_errors_name_the_file(tmp_path):
    import torch

    from modelatlas.atomic import atomic_save_tensors, read_tensors
    from modelatlas.errors import CheckpointError

    path = atomic_save_tensors(tmp_path / "t.safetensors", {"a": torch.arange(3)})
    assert torch.equal(read_tensors(path)["a"], torch.arange(3))
    with pytest.raises(CheckpointError, match=r"gone\.safetensors: missing; rerun it"):
        read_tensors(tmp_path / "gone.safetensors", "rerun it")
    path.write_bytes(path.read_bytes()[:20])  # truncated
    with pytest.raises(CheckpointError, match=r"t\.safetensors: unreadable \("):
        read_tensors(path)


def test_written_files_get_the_usual_permissions(tmp_path):
    """Like open(): mode 0666 less the umask (mkstemp's 0600 would make a shared atlas.html unreadable)."""
    import os

    old = os.umask(0o022)
    try:
        assert (atomic_write_json(tmp_path / "r.json", {}).stat().st_mode & 0o777) == 0o644
        assert (atomic_save_tensors(tmp_path / "w.safetensors", {"a": torch.ones(1)}).stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)


def test_write_errors_name_the_destination_not_the_temporary_file(tmp_path):
    import errno

    (tmp_path / "out.json").mkdir()  # --out at an existing folder
    with pytest.raises(IsADirectoryError) as info:
        atomic_write_json(tmp_path / "out.json", {})
    assert info.value.filename == str(tmp_path / "out.json") and ".tmp" not in str(info.value)

    def full_disk(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device: '.*result\.bin'"):
        atomic_write(tmp_path / "result.bin", full_disk)

    def reads_another(tmp):
        open(tmp_path / "missing-input")

    with pytest.raises(FileNotFoundError) as info:  # an error about another file keeps its name
        atomic_write(tmp_path / "x.bin", reads_another)
    assert info.value.filename == str(tmp_path / "missing-input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left


def test_read_json_object_names_the_file_for_each_failure(tmp_path):
    from modelatlas.atomic import read_json_object
    from modelatlas.errors import CheckpointError

    p = tmp_path / "x.json"
    with pytest.raises(CheckpointError, match=rf"{tmp_path.name}: no settings here"):
        read_json_object(p, "no settings here", "settings")
    for text, words in (("{", r"x\.json: cannot read"), ("[1]", r"x\.json: not settings \(a JSON list, not an object\)")):
        p.write_text(text)
        with pytest.raises(CheckpointError, match=words):
            read_json_object(p, "no settings here", "settings")
    p.write_text('{"a": 1}')
    assert read_json_object(p, "", "") == {"a": 1}


def test_tensors_in_a_folder_named_by_bytes_that_are_not_utf8_round_trip(tmp_path, non_utf8_name):
    """safetensors' reader refused the folder's path ("is not valid UTF-8"): a cache or saved run there was lost."""
    p = atomic_save_tensors(tmp_path / non_utf8_name / "cache.safetensors", {"w": torch.arange(3.0)})
    assert torch.equal(read_tensors(p)["w"], torch.arange(3.0))


def test_a_name_that_is_not_utf8_is_written_as_text_escaped_and_as_json_kept(tmp_path):
    name = "m\udce9 \ud800"  # b"m\xe9" held as a surrogate escape, and a lone surrogate of no byte
    atomic_write_text(tmp_path / "f.dot", f'"{name}";')  # raised UnicodeEncodeError after the whole command
    assert (tmp_path / "f.dot").read_text(encoding="utf-8") == '"m\\xe9 \\ud800";'
    atomic_write_json(tmp_path / "f.json", {"nodes": [name]})  # ASCII escapes: reads back as the same name
    assert json.loads((tmp_path / "f.json").read_text(encoding="utf-8")) == {"nodes": [name]}


def test_check_out_folder_refuses_a_file_and_a_path_below_one(tmp_path):
    from modelatlas.atomic import check_out_folder, file_in_the_way
    from modelatlas.errors import AtlasError, ConfigError

    (tmp_path / "f").write_text("x")
    assert file_in_the_way(tmp_path / "f" / "a" / "b") == tmp_path / "f"
    assert file_in_the_way(tmp_path / "new" / "a") is None  # a missing folder is made when written
    with pytest.raises(ConfigError, match=r"^--out .*f is a file, not a folder; choose a new --out$"):
        check_out_folder(tmp_path / "f", f"--out {tmp_path / 'f'}", "choose a new --out")
    with pytest.raises(AtlasError, match=r"^x lies below the file .*f, not a folder; fix it$") as e:
        check_out_folder(tmp_path / "f" / "a", "x", "fix it", AtlasError)
    assert type(e.value) is AtlasError
    check_out_folder(tmp_path, "x", "fix it")  # an existing folder is no error


def test_check_out_folder_refuses_a_symbolic_link_to_nothing(tmp_path):
    """A link whose target is gone (an unmounted disk): the folder cannot be made through it, which said
    'File exists' only at the first write, after the work. A link to a folder is that folder."""
    from modelatlas.atomic import check_out_folder, file_in_the_way
    from modelatlas.errors import ConfigError

    (tmp_path / "gone").symlink_to(tmp_path / "missing" / "out")
    assert file_in_the_way(tmp_path / "gone") == file_in_the_way(tmp_path / "gone" / "a") == tmp_path / "gone"
    with pytest.raises(ConfigError, match=r"^o is a symbolic link to the missing .*missing/out, not a folder; fix$"):
        check_out_folder(tmp_path / "gone", "o", "fix")
    with pytest.raises(ConfigError, match=r"^o lies below the symbolic link .*gone to the missing .*out, not a folder"):
        check_out_folder(tmp_path / "gone" / "a", "o", "fix")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    check_out_folder(tmp_path / "link" / "a", "o", "fix")


def test_check_out_folder_refuses_a_folder_where_no_file_can_be_made(tmp_path, monkeypatch):
    """A read-only mount or folder was found only when the first file was written, after the work; the check
    makes and removes a file (os.access says yes to root everywhere) and leaves nothing behind."""
    import errno
    import os

    from modelatlas import atomic
    from modelatlas.errors import ConfigError

    assert atomic.unwritable(tmp_path / "new" / "out") is None and list(tmp_path.iterdir()) == []
    real_open = os.open

    def read_only(path, *args):
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args)

    monkeypatch.setattr(atomic.os, "open", read_only)
    with pytest.raises(ConfigError, match=rf"^--out {tmp_path}/a/b cannot be written: no file can be made in "
                                          rf"{tmp_path} \(Read-only file system\); choose a new --out$"):
        atomic.check_out_folder(tmp_path / "a" / "b", f"--out {tmp_path / 'a' / 'b'}", "choose a new --out")


@pytest.mark.skipif(not os.path.isfile("/proc/version"), reason="needs Linux's /proc")
def test_a_folder_of_proc_takes_no_new_files():
    from modelatlas.atomic import cannot_write, unwritable

    denied = unwritable("/proc/atlas-out")
    assert denied is not None and denied[0].as_posix() == "/proc"
    assert cannot_write("--out /proc/atlas-out", denied) == ("--out /proc/atlas-out cannot be written: no file can "
                                                             "be made in /proc (it takes no new files)")

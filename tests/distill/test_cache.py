from pathlib import Path

import pytest
import torch

from modelatlas.data.registry import ArrayDataset
from modelatlas.distill import run_distillation
from modelatlas.distill.cache import cache_key, cache_root
from modelatlas.errors import ConfigError


def make_data(shift=0.0, name="d"):
    x = torch.arange(24, dtype=torch.float32).reshape(6, 1, 2, 2) / 24 + shift
    return ArrayDataset(name, x, torch.tensor([0, 1, 0, 1, 0, 1]), ["a", "b"], {})


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "atlas"))
    monkeypatch.setenv("MODELATLAS_CACHE", str(tmp_path / "old"))
    assert cache_root("mtt") == tmp_path / "atlas" / "mtt"
    assert cache_root("mtt", tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv("ATLAS_CACHE_DIR")
    assert cache_root("hello") == tmp_path / "old" / "hello"
    monkeypatch.delenv("MODELATLAS_CACHE")
    assert cache_root("teddy") == Path.home() / ".cache" / "modelatlas" / "teddy"


def test_cache_key_changes_with_data_fields_and_seed():
    base = cache_key(make_data(), {"steps": 5}, 0)
    assert base == cache_key(make_data(), {"steps": 5}, 0) and len(base) == 16
    assert len({base, cache_key(make_data(0.5), {"steps": 5}, 0), cache_key(make_data(name="e"), {"steps": 5}, 0),
                cache_key(make_data(), {"steps": 6}, 0), cache_key(make_data(), {"steps": 5}, 1)}) == 5


def test_cache_key_tells_flipped_images_apart():
    """The fingerprint was the pixels' sum and sum of squares: every image flipped left-right (the same sums)
    found the entry trained on the unflipped images."""
    data = make_data()
    flipped = ArrayDataset("d", data.x.flip(-1), data.y, data.classes, {})
    assert cache_key(data, {"steps": 5}, 0) != cache_key(flipped, {"steps": 5}, 0)
    swapped = ArrayDataset("d", data.x, data.y.flip(0), data.classes, {})  # the same label counts, moved
    assert cache_key(data, {"steps": 5}, 0) != cache_key(swapped, {"steps": 5}, 0)


def test_trained_on_reads_the_device_of_an_entry_and_none_where_it_records_none(tmp_path):
    from safetensors.torch import save_file

    from modelatlas.distill.cache import trained_on

    save_file({"w": torch.zeros(2)}, str(tmp_path / "new.safetensors"), metadata={"key": "k", "device": "cuda"})
    save_file({"w": torch.zeros(2)}, str(tmp_path / "old.safetensors"), metadata={"key": "k"})
    (tmp_path / "pool.json").write_text('{"files": [], "device": "cpu"}')
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file of tensors")
    got = [trained_on(tmp_path / n) for n in ("new.safetensors", "old.safetensors", "pool.json", "list.json",
                                              "bad.safetensors", "missing.safetensors")]
    assert got == ["cuda", None, "cpu", None, None, None]


TRAINS = {"mtt": "modelatlas.distill.methods.mtt.buffer.train_expert",
          "teddy": "modelatlas.distill.methods.teddy.pool.build_pool",
          "hello": "modelatlas.distill.methods.hello.method.train_teacher"}


@pytest.mark.parametrize("method", sorted(TRAINS))
def test_a_cache_folder_that_takes_no_file_is_refused_before_training(tmp_path, monkeypatch, tiny, method):
    """`--set cache_dir=forest.json` (a file) trained MTT's experts, then failed at their save with "forest.json:
    File exists" (a folder below /proc: "No such file or directory"), the training lost. Refused before it now,
    naming the setting and the fix; $ATLAS_CACHE_DIR alike. --out stays as it was."""
    monkeypatch.setattr(TRAINS[method], lambda *a, **k: pytest.fail("trained before the cache folder was checked"))
    (tmp_path / "forest.json").write_text("{}")
    cfg = {**tiny(method, tmp_path), "cache_dir": str(tmp_path / "forest.json")}
    fix = r"; pass a folder with --set cache_dir=DIR \(cache_dir=\), or set \$ATLAS_CACHE_DIR$"
    with pytest.raises(ConfigError, match=rf"^cache_dir {tmp_path / 'forest.json'}\S* (is a file|lies below the "
                                          rf"file {tmp_path / 'forest.json'}), not a folder{fix}"):
        run_distillation(method, "digits", 1, tmp_path / "out", config=cfg, eval_nets=1, eval_epochs=1)
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "forest.json"))
    with pytest.raises(ConfigError, match=rf"^the cache folder {tmp_path / 'forest.json' / method}\S* \(\$ATLAS_CACHE"
                                          rf"_DIR, else ~/\.cache\) lies below the file {tmp_path / 'forest.json'}"):
        run_distillation(method, "digits", 1, tmp_path / "out", config={**cfg, "cache_dir": None}, eval_nets=1,
                         eval_epochs=1)
    assert not (tmp_path / "out").exists()


def check_killed_while_writing(folder, name):
    """Run a UnitStore.put of unit ``name`` in a fresh interpreter that receives SIGTERM (a scheduler's time limit,
    `timeout`) once the unit's temporary file is written: no clean-up runs. Returns the files left in ``folder``."""
    import os
    import subprocess
    import sys

    import modelatlas

    code = ("import os, signal, sys\nfrom pathlib import Path\nimport safetensors.torch as st, torch\n"
            "from modelatlas.distill.cache import UnitStore\nsave = st.save_file\n"
            "def dying(tensors, filename, metadata=None):\n    save(tensors, filename, metadata=metadata)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\nst.save_file = dying\n"
            f"UnitStore(Path({str(folder)!r}), 'cpu').put({name!r}, {{'trajectory': torch.zeros(3, 4)}})\n")
    env = {**os.environ, "PYTHONPATH": str(Path(modelatlas.__file__).parents[1])}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode != 0
    return sorted(folder.iterdir())


def test_a_unit_whose_run_was_killed_while_writing_it_leaves_no_temporary_file(tmp_path):
    """SIGTERM while a unit was written left its temporary file (as large as the unit: an MTT expert's
    trajectory) for good: never read, and it kept the folder from being removed once the whole entry was cached."""
    import os
    import time

    from modelatlas.distill.cache import UnitStore

    folder = tmp_path / "buffer-k.partial"
    left = check_killed_while_writing(folder, "expert0")
    assert len(left) == 1 and left[0].name.startswith(".expert0.safetensors.") and left[0].name.endswith(".tmp")
    assert UnitStore(folder, "cpu").get("expert0", {"trajectory": (3, 4)}) is None  # never read as the unit
    assert left[0].exists()  # written a moment ago: kept a minute (a process of the same id elsewhere)
    os.utime(left[0], (time.time() - 61, time.time() - 61))
    store = UnitStore(folder, "cpu")  # the rerun
    assert list(folder.iterdir()) == []
    store.put("expert0", {"trajectory": torch.ones(3, 4)})
    assert store.get("expert0", {"trajectory": (3, 4)})["trajectory"].sum() == 12
    store.remove(["expert0"])
    assert not folder.exists()


def test_a_temporary_file_of_a_write_in_progress_is_kept(tmp_path):
    """Two runs of one config at once (an MTT buffer shared by runs of several --ipc) write the same units: one
    must not delete the other's file mid-write. Kept: this live process's, another machine's younger than an hour;
    removed: another machine's untouched for an hour, and one named as before session 40 (no writer) as old."""
    import os
    import time

    from modelatlas.atomic import _temp_path, remove_stale_temp_files

    mine = _temp_path(tmp_path / "expert0.safetensors")
    other = tmp_path / ".expert1.safetensors.0123abcd-77-00ff00ff.tmp"  # another machine's hash, process 77
    gone, unnamed = tmp_path / ".expert2.safetensors.0123abcd-78-00ff00ff.tmp", tmp_path / ".expert3.safetensors.a1b2c3.tmp"
    for p in (mine, other, gone, unnamed, tmp_path / "expert4.safetensors"):
        p.write_bytes(b"x")
    hour_ago = time.time() - 3601
    for p in (mine, gone, unnamed):
        os.utime(p, (hour_ago, hour_ago))
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([gone, unnamed])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name, "expert4.safetensors"])


def test_the_cache_folder_check_removes_an_entry_a_killed_run_was_writing(tmp_path):
    """An MTT buffer (or HeLlO teacher) stopped by SIGTERM while it was written left a temporary file as large as
    the whole entry in the cache folder; the next run that trains there removes it."""
    import os
    import time

    from modelatlas.distill.cache import check_cache_folder

    left = tmp_path / ".buffer-0123.safetensors.a1b2c3d4e5f6.tmp"  # named as before session 40: no writer named
    left.write_bytes(b"x")
    os.utime(left, (time.time() - 3601, time.time() - 3601))
    check_cache_folder(tmp_path, tmp_path)
    assert list(tmp_path.iterdir()) == []

"""`atlas lineage recover` on awkward inputs, as a user with an undocumented folder of checkpoints meets them."""

import json
import shutil
from pathlib import Path

import pytest

from modelatlas.cli.main import main

from .test_lineage_cli import make_tiny_zoo


@pytest.fixture
def locked(monkeypatch):
    """Make every path strictly below a folder named ``locked`` unreadable, as a folder without read permission
    is (the tests run as root, whom permissions do not stop): listing it or looking at a file in it fails."""
    stat, listing = Path.stat, Path.iterdir

    def below_locked(path: Path) -> bool:
        return "locked" in path.parts[:-1]

    def denied(path: Path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "stat", lambda self, **kw: denied(self) if below_locked(self) else stat(self, **kw))
    monkeypatch.setattr(Path, "iterdir", lambda self: denied(self / "x") if self.name == "locked" else listing(self))


@pytest.mark.parametrize("base", [False, True])
def test_an_unreadable_model_folder_is_skipped_and_the_run_goes_on(tmp_path, capsys, locked, base):
    # a model folder without read permission among readable models ended the whole run in
    # "error: .../adapter_config.json: Permission denied" (the CLI's adapter-zoo note), and past that in the
    # recovery's own expansion of the path
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    make_tiny_zoo(zoo)
    (zoo / "locked").mkdir()
    shutil.copy(zoo / "t1_1.safetensors", zoo / "locked" / "model.safetensors")
    extra = ["--base", str(zoo / "t0.safetensors")] if base else []
    assert main(["lineage", "recover", str(zoo), "--stage", "specialize", *extra]) == 0
    captured = capsys.readouterr()
    assert "skipped locked: " in captured.err and "cannot read: Permission denied" in captured.err
    assert "6 models" in captured.out  # the zoo's six, the locked one left out


def test_an_unreadable_model_folder_given_alone_is_one_error_line(tmp_path, capsys, locked):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    make_tiny_zoo(zoo)
    (zoo / "locked").mkdir()
    shutil.copy(zoo / "t1_1.safetensors", zoo / "locked" / "model.safetensors")
    assert main(["lineage", "recover", str(zoo / "locked")]) == 1
    assert capsys.readouterr().err == f"error: {zoo / 'locked'}: cannot read: Permission denied\n"
    assert main(["lineage", "recover", str(zoo / "locked"), str(zoo), "--stage", "specialize"]) == 0
    assert f"skipped: {zoo / 'locked'}: cannot read: Permission denied" in capsys.readouterr().err


def test_a_truncated_model_is_skipped_and_its_missed_edge_is_said(tmp_path, capsys):
    # with --truth, the true edge of a model that could not be read counts as a miss: the score read 3/4 with
    # every edge drawn marked right and no word of the fourth
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    make_tiny_zoo(zoo)
    data = (zoo / "t1_1.safetensors").read_bytes()
    (zoo / "t1_1.safetensors").write_bytes(data[:200])
    out = tmp_path / "forest.json"
    assert main(["lineage", "recover", str(zoo), "--truth", str(zoo), "--stage", "specialize", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped t1_1: " in captured.err and "truncated file" in captured.err
    assert "(3/4)" in captured.out and "; 1 true edge missed: its model was skipped (see above)" in captured.out
    data = json.loads(out.read_text())
    assert data["skipped"].keys() == {"t1_1"} and data["scores"]["true_edges_with_skipped_models"] == 1


def test_no_merges_help_names_every_merge_it_turns_off(capsys):
    # --no-merges also turns off SLERP, TIES / DARE and mergekit_config.yml merges; its help named only "linear
    # merges, task arithmetic"
    with pytest.raises(SystemExit):
        main(["lineage", "recover", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_text = text[text.index("--no-merges place"):]
    for kind in ("linear", "task arithmetic", "SLERP", "TIES", "DARE", "mergekit_config.yml"):
        assert kind in help_text


def _runs(tmp_path) -> Path:
    """A folder of training runs, each a folder of checkpoints: runs/a/{t0,t0_0}.safetensors, runs/b/t0_1..."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    make_tiny_zoo(zoo)
    runs = tmp_path / "runs"
    for run, names in {"a": ("t0", "t0_0"), "b": ("t0_1",), ".hidden": ("t1",)}.items():
        (runs / run).mkdir(parents=True)
        for name in names:
            shutil.copy(zoo / f"{name}.safetensors", runs / run)
    return runs


def test_models_one_folder_down_are_named_not_silently_missed(tmp_path, capsys):
    # a folder of runs said "no models found in runs"; beside a model at its top, that model was compared alone
    runs = _runs(tmp_path)
    assert main(["lineage", "recover", str(runs)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: no models found in {runs}; {runs / 'a'}, {runs / 'b'} hold 3 models one folder down (a "
                   f"folder's models are read only directly inside it): give those folders, e.g. {runs / '*'}\n")
    shutil.copy(tmp_path / "zoo" / "t1.safetensors", runs)
    assert main(["lineage", "recover", str(runs)]) == 0
    captured = capsys.readouterr()
    assert f"note: {runs / 'a'}, {runs / 'b'} hold 3 models one folder down" in captured.err
    assert "1 model, 1 tree" in captured.out
    assert main(["lineage", "recover", str(runs / "a"), str(runs / "b"), str(runs / "t1.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.err and "4 models" in captured.out


def test_a_dangling_link_in_a_run_folder_does_not_make_it_one_broken_model(tmp_path, capsys):
    """runs/a holding a link whose target is gone counted as one broken model folder; recovery then read the models
    inside it anyway: `recover runs` compared runs/a's models one level down, and not runs/b's."""
    runs = _runs(tmp_path)
    (runs / "a" / "latest.safetensors").symlink_to(tmp_path / "gone.safetensors")
    assert main(["lineage", "recover", str(runs)]) == 1
    assert capsys.readouterr().err.startswith(f"error: no models found in {runs}; {runs / 'a'}, {runs / 'b'} hold 3 "
                                              "models one folder down")
    assert main(["lineage", "recover", str(runs / "a"), str(runs / "b")]) == 0
    captured = capsys.readouterr()  # given, the folder's link is skipped, naming it
    assert (f"skipped latest: {runs / 'a' / 'latest.safetensors'}: a link to {tmp_path / 'gone.safetensors'}, which "
            "does not exist\n") in captured.err
    assert "3 models" in captured.out


def test_a_folder_of_models_beside_a_dangling_model_safetensors_is_a_folder_of_models(tmp_path, capsys):
    """A dangling model.safetensors (a pruned hub blob) made runs/a one broken model though models sit in it."""
    runs = _runs(tmp_path)
    (runs / "a" / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    (runs / "c").mkdir()  # alone, it is one model whose weights are gone: reported and skipped
    (runs / "c" / "config.json").write_text("{}")
    (runs / "c" / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    shutil.copy(tmp_path / "zoo" / "t1.safetensors", runs)
    assert main(["lineage", "recover", str(runs)]) == 0
    captured = capsys.readouterr()
    assert f"note: {runs / 'a'}, {runs / 'b'} hold 3 models one folder down" in captured.err
    assert f"skipped c: {runs / 'c' / 'model.safetensors'}: a link to {tmp_path / 'gone.safetensors'}" in captured.err
    assert "1 model, 1 tree" in captured.out


def test_the_current_folder_s_runs_are_suggested_as_dot_slash_star(tmp_path, capsys, monkeypatch):
    """`atlas lineage recover .` over a folder of run folders suggested "e.g. *" (the folder "." has no name)."""
    monkeypatch.chdir(_runs(tmp_path))
    assert main(["lineage", "recover", "."]) == 1
    assert capsys.readouterr().err.rstrip("\n").endswith("give those folders, e.g. ./*")

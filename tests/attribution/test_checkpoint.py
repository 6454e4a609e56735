"""attribute_to_folder with validation keeps its state in OUT/checkpoint: an interrupted leave-one-cluster-out
retraining resumes where it stopped and gives the results of an uninterrupted run; a resume of other settings,
or a fresh run over a kept state, is refused."""

import json

import pytest
import torch

import modelatlas.attribution.folder as folder_mod
from modelatlas.atomic import read_tensors
from modelatlas.attribution import DDMConfig, attribute_to_folder
from modelatlas.attribution import target as T
from modelatlas.attribution.checkpoint import FOLDER, LOO_JSON, progress_of
from modelatlas.errors import CheckpointError, ConfigError

CFG = DDMConfig(clusters_per_class=2, train_steps=5, match_steps=2)  # 4 clusters on the planted data


def _stop_after(monkeypatch, k, error=KeyboardInterrupt):
    """Make the (k+1)-th leave-one-cluster-out retraining (a train call with weights) raise ``error``."""
    real, calls = T.train, []

    def train(*a, **kw):
        if kw.get("weights") is not None:
            calls.append(1)
            if len(calls) == k + 1:
                raise error()
        return real(*a, **kw)
    monkeypatch.setattr(T, "train", train)
    return calls


def _run(out, planted, **kw):
    return attribute_to_folder(out, planted, 2, kw.pop("cfg", CFG), kw.pop("seed", 0), "planted", validate=True,
                               **kw)


@pytest.mark.parametrize("error, every_s", [(KeyboardInterrupt, 1e9), (RuntimeError, 0.0)])
def test_an_interrupted_validation_resumes_to_the_results_of_a_straight_run(tmp_path, planted, monkeypatch,
                                                                             error, every_s):
    """Ctrl-C saves the clusters done; a hard stop keeps the last periodic save (every_s=0: every cluster)."""
    attr, info, true = _run(tmp_path / "straight", planted)
    with monkeypatch.context() as m:
        _stop_after(m, 2, error)
        with pytest.raises(error):
            _run(tmp_path / "cut", planted, every_s=every_s)
    assert progress_of(tmp_path / "cut") == {"ddm": True, "loo_done": 2, "loo_total": 4}
    kept = json.loads((tmp_path / "cut" / "attribution.json").read_text())  # DDM's result, written before LOO
    assert kept["validation_pending"] is True and "validation" not in kept
    assert torch.equal(read_tensors(tmp_path / "cut" / "attribution.safetensors")["matrix"], attr.matrix)
    monkeypatch.setattr(folder_mod, "ddm_attribution", lambda *a, **k: pytest.fail("DDM recomputed on resume"))
    calls = _stop_after(monkeypatch, 99)
    attr2, info2, true2 = _run(tmp_path / "cut", planted, resume=True, every_s=every_s)
    assert len(calls) == 2  # only the clusters left were retrained
    assert torch.equal(attr2.matrix, attr.matrix) and torch.equal(true2, true)
    scores = ("flattened", "per_test_mean", "within_class")  # the rest are timings
    assert [info2["validation"][k] for k in scores] == [info["validation"][k] for k in scores]
    a, b = (read_tensors(tmp_path / d / "attribution.safetensors") for d in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / FOLDER).exists()  # removed once the results are written


def test_a_resume_with_other_settings_is_refused_naming_what_differs(tmp_path, planted, monkeypatch):
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, planted)
    for kw, words in [({"seed": 1}, "seed was 0 in the interrupted run, now 1"),
                      ({"cfg": DDMConfig(clusters_per_class=2, train_steps=6, match_steps=2)},
                       "train_steps was 5 in the interrupted run, now 6")]:
        with pytest.raises(CheckpointError, match="cannot resume: " + words) as e:
            _run(tmp_path, planted, resume=True, **kw)
        assert "\n" not in str(e.value) and "start over" in str(e.value)
    x, y, xt, yt = planted
    with pytest.raises(CheckpointError, match="data was"):  # same sizes, other values
        _run(tmp_path, (x + 1, y, xt, yt), resume=True)
    with pytest.raises(CheckpointError, match="validate was true in the interrupted run, now false"):
        attribute_to_folder(tmp_path, planted, 2, CFG, 0, "planted", validate=False, resume=True)
    assert progress_of(tmp_path)["loo_done"] == 1  # the refusals left the state as it was


def test_a_fresh_run_over_a_kept_state_is_refused_and_a_resume_of_nothing_starts_over(tmp_path, planted,
                                                                                    monkeypatch):
    with monkeypatch.context() as m:
        _stop_after(m, 0)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path / "cut", planted)
    assert progress_of(tmp_path / "cut")["loo_done"] == 0
    with pytest.raises(ConfigError, match="holds an interrupted attribution; pass --resume"):
        _run(tmp_path / "cut", planted)
    attr, info, true = _run(tmp_path / "new", planted, resume=True)  # nothing to resume: a full run
    assert true.shape == (4, len(planted[2])) and "validation" in info


def test_a_damaged_loo_state_is_one_error(tmp_path, planted, monkeypatch):
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, planted)
    (tmp_path / FOLDER / LOO_JSON).write_text(json.dumps({"done": 3, "tensors": "loo-1.safetensors", "wall_s": 1}))
    with pytest.raises(CheckpointError, match="do not fit 3 rows"):
        _run(tmp_path, planted, resume=True)
    (tmp_path / FOLDER / LOO_JSON).write_text("[]")
    with pytest.raises(CheckpointError, match="not a LOO state"):
        _run(tmp_path, planted, resume=True)


def test_a_run_stopped_after_its_last_retraining_resumes_without_retraining(tmp_path, planted, monkeypatch):
    """Stopped between writing the results and removing the checkpoint: the resume rewrites them, retraining
    nothing."""
    from modelatlas.attribution.checkpoint import RunCheckpoint

    with monkeypatch.context() as m:
        m.setattr(RunCheckpoint, "remove", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, planted)
    assert progress_of(tmp_path) == {"ddm": True, "loo_done": 4, "loo_total": 4}
    calls = _stop_after(monkeypatch, 99)
    _, info, _ = _run(tmp_path, planted, resume=True)
    assert calls == [] and "validation" in info and not (tmp_path / FOLDER).exists()


def test_loo_alone_refuses_the_rows_of_a_run_of_other_settings(tmp_path, planted):
    """loo_attribution(..., checkpoint=RunCheckpoint(out, settings)) returned the rows another run (other
    settings, here train_steps) had saved there, as its own: loo.json recorded no settings."""
    from modelatlas.attribution import loo_attribution
    from modelatlas.attribution.checkpoint import RunCheckpoint

    x, y, xt, yt = planted
    assign = torch.arange(len(y)) % 4
    loo_attribution(x, y, xt, yt, 2, assign, CFG, checkpoint=RunCheckpoint(tmp_path, {"train_steps": 5}))
    other = DDMConfig(clusters_per_class=2, train_steps=7, match_steps=2)
    with pytest.raises(CheckpointError, match="loo.json: cannot resume: train_steps was 5 in the interrupted run, "
                                              "now 7"):
        loo_attribution(x, y, xt, yt, 2, assign, other, checkpoint=RunCheckpoint(tmp_path, {"train_steps": 7}))


def _flip_last_value(path):
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x04  # a value's bits, not the header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, saved_in", [("loo-1.safetensors", "loo.json"), ("ddm.safetensors", "run.json")])
def test_a_flipped_bit_of_a_kept_tensor_file_is_refused_naming_it(tmp_path, planted, monkeypatch, name, saved_in):
    """A kept LOO row or the kept DDM state with a bit flipped resumed silently into another attribution
    (fuzzed, session 40): run.json and loo.json record their tensor file's SHA-256, and the state is kept."""
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, planted)
    _flip_last_value(tmp_path / FOLDER / name)
    kept = sorted(p.name for p in (tmp_path / FOLDER).iterdir())
    with pytest.raises(CheckpointError, match=rf"{name}: is not the file {saved_in} was saved with \(damaged since: "
                                              r"its SHA-256 differs\); delete .* to start over"):
        _run(tmp_path, planted, resume=True)
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == kept


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("name", ["run.json", "loo.json"])
def test_a_folder_in_place_of_a_state_file_is_refused_before_any_work(tmp_path, planted, monkeypatch, name, resume):
    """run.json as a folder was taken for no state: the run started over and dropped the kept LOO rows, then
    failed to write run.json; loo.json as one: every cluster was retrained, then its write failed (fuzzed)."""
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, planted)
    (tmp_path / FOLDER / name).unlink()
    (tmp_path / FOLDER / name).mkdir()
    kept = sorted(p.name for p in (tmp_path / FOLDER).iterdir())
    with pytest.raises(CheckpointError, match=rf"{name}: is not a file \(a folder\?\); delete .* to start over"):
        _run(tmp_path, planted, resume=resume)
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == kept


@pytest.mark.parametrize("key, value", [("timings", {"total_s": [1, 2], "online_s": 1}), ("timings", [1]),
                                        ("match_losses", ["x"]), ("timings", {"online_s": 1}), ("x", None),
                                        ("timings", {"total_s": 0, "online_s": 1})])
def test_timings_and_losses_of_another_type_in_run_json_are_named(tmp_path, planted, monkeypatch, key, value):
    """A timing of another type ended the resume in a TypeError traceback when the report added them (fuzzed)."""
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, planted)
    path = tmp_path / FOLDER / "run.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, key: value} if key != "x" else {k: v for k, v in meta.items() if k != "timings"}))
    with pytest.raises(CheckpointError, match=r"run\.json: cannot resume: its timings \(total_s > 0, online_s >= 0\) "
                                              "and match_losses must be numbers"):
        _run(tmp_path, planted, resume=True)


@pytest.mark.parametrize("name", ["I4", "loo%3.safetensors", "../loo-1.safetensors.gone", ".", ""])
def test_a_loo_json_naming_a_missing_tensor_file_is_named(tmp_path, planted, monkeypatch, name):
    """It named the missing file ('checkpoint/I4: missing'), not loo.json, the file edited (fuzzed)."""
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, planted)
    path = tmp_path / FOLDER / LOO_JSON
    path.write_text(json.dumps({**json.loads(path.read_text()), "tensors": name}))
    with pytest.raises(CheckpointError, match=r"loo\.json: cannot resume: the tensor file it names, '.*', is "
                                              "missing; delete "):
        _run(tmp_path, planted, resume=True)

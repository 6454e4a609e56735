"""DDM's offline phase keeps its finished units (clusters, target model, matching as it goes) in OUT/checkpoint:
a run interrupted there continues from the last one kept and gives, bit for bit, the results of an uninterrupted
run; a resume with other settings is refused naming what changed."""

import json

import pytest
import torch
from tests.attribution.conftest import make_stop

import modelatlas.attribution.ddm as ddm_mod
from modelatlas.atomic import read_tensors
from modelatlas.attribution import DDMConfig, attribute_to_folder, ddm_attribution
from modelatlas.attribution import newton as N
from modelatlas.attribution import target as T
from modelatlas.attribution.checkpoint import FOLDER, OFFLINE_JSON, RunCheckpoint, progress_of
from modelatlas.errors import CheckpointError, ConfigError

CFG = DDMConfig(clusters_per_class=2, train_steps=5, match_steps=6)  # 4 clusters on the planted data
_FIELDS = ("matrix", "assign", "cluster_class", "synthetic", "synthetic_labels", "base_losses")


def check_same(a, b):
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in _FIELDS) and a.match_losses == b.match_losses


def make_ckpt(folder, every_s=1e9, **settings):
    return RunCheckpoint(folder, {"seed": 0, **CFG.to_dict(), **settings}, every_s)


def no_redo(monkeypatch, train=True):
    """Clustering and (``train``) training the target model again fail the test (their units are kept)."""
    monkeypatch.setattr(ddm_mod, "cluster_per_class", lambda *a, **k: pytest.fail("clustered again"))
    if train:
        monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("target model trained again"))


@pytest.mark.parametrize("stop, error, every_s", [(0, KeyboardInterrupt, 1e9), (3, KeyboardInterrupt, 1e9),
                                                  (4, RuntimeError, 0.0)])
def test_an_interrupted_matching_resumes_to_the_results_of_a_straight_run(tmp_path, planted, monkeypatch, stop,
                                                                          error, every_s):
    """Ctrl-C saves the steps done; a hard stop keeps the last periodic save (every_s=0: every step)."""
    straight = ddm_attribution(*planted, 2, CFG, seed=0)
    with pytest.raises(error):
        ddm_attribution(*planted, 2, CFG, 0, make_stop(stop, error), checkpoint=make_ckpt(tmp_path, every_s))
    kept = progress_of(tmp_path)
    assert kept == {"ddm": False, "units": ["clusters", "target", "match"] if stop else ["clusters", "target"],
                    "match": [stop, 6] if stop else None}
    no_redo(monkeypatch)
    progress = make_stop(None)
    resumed = ddm_attribution(*planted, 2, CFG, 0, progress, checkpoint=make_ckpt(tmp_path))
    check_same(resumed, straight)
    assert progress.totals == [6 - stop]  # only the steps left were taken
    assert resumed.timings["total_s"] >= resumed.timings["cluster_s"] + resumed.timings["train_target_s"] > 0


def test_a_ctrl_c_inside_an_adam_step_saves_nothing_half_done(tmp_path, planted, monkeypatch):
    """Stopped between Adam's update and the loss it belongs to, the images are ahead of the losses: the state
    of the step before (saved periodically) is the one kept."""
    straight = ddm_attribution(*planted, 2, CFG, seed=0)
    real, calls = torch.optim.Adam.step, []

    def step(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return out
    with monkeypatch.context() as m:
        m.setattr(torch.optim.Adam, "step", step)
        with pytest.raises(KeyboardInterrupt):
            ddm_attribution(*planted, 2, CFG, 0, checkpoint=make_ckpt(tmp_path, every_s=0.0))
    assert progress_of(tmp_path)["match"] == [3, 6]
    check_same(ddm_attribution(*planted, 2, CFG, 0, checkpoint=make_ckpt(tmp_path)), straight)


def test_a_finished_matching_is_not_redone(tmp_path, planted, monkeypatch):
    """Stopped after the last matching step (in the Hessian): the resume only recomputes the online part."""
    straight = ddm_attribution(*planted, 2, CFG, seed=0)
    with monkeypatch.context() as m:
        m.setattr(N, "damped_cholesky", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            ddm_attribution(*planted, 2, CFG, 0, checkpoint=make_ckpt(tmp_path))
    assert progress_of(tmp_path)["match"] == [6, 6]
    no_redo(monkeypatch)
    progress = make_stop(None)
    check_same(ddm_attribution(*planted, 2, CFG, 0, progress, checkpoint=make_ckpt(tmp_path)), straight)
    assert progress.totals == []  # no matching bar: nothing left to match


def _cut(out, planted, stop=2, validate=False, **kw):
    with pytest.raises(KeyboardInterrupt):
        attribute_to_folder(out, planted, 2, CFG, 0, "planted", validate=validate, progress=make_stop(stop), **kw)


@pytest.mark.parametrize("validate", [False, True])
def test_an_attribution_folder_interrupted_in_ddm_resumes_to_the_files_of_a_straight_run(tmp_path, planted,
                                                                                          monkeypatch, validate):
    attribute_to_folder(tmp_path / "straight", planted, 2, CFG, 0, "planted", validate=validate)
    _cut(tmp_path / "cut", planted, validate=validate)
    assert progress_of(tmp_path / "cut")["match"] == [2, 6] and not (tmp_path / "cut" / "attribution.json").exists()
    with pytest.raises(ConfigError, match="holds an interrupted attribution; pass --resume"):
        attribute_to_folder(tmp_path / "cut", planted, 2, CFG, 0, "planted", validate=validate)
    no_redo(monkeypatch, train=not validate)  # the leave-one-cluster-out retraining trains models
    attribute_to_folder(tmp_path / "cut", planted, 2, CFG, 0, "planted", validate=validate, resume=True)
    a, b = (read_tensors(tmp_path / d / "attribution.safetensors") for d in ("straight", "cut"))
    assert a.keys() == b.keys() and ("loo_matrix" in a) == validate and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / FOLDER).exists()  # removed once the results are written


def test_a_resume_of_ddm_with_other_settings_is_refused_naming_what_differs(tmp_path, planted):
    _cut(tmp_path, planted)
    other = DDMConfig(clusters_per_class=2, train_steps=5, match_steps=7)
    x, y, xt, yt = planted
    for args, kw, words in [((planted, 2, other, 0), {}, "match_steps was 6 in the interrupted run, now 7"),
                            ((planted, 2, CFG, 1), {}, "seed was 0 in the interrupted run, now 1"),
                            (((x + 1, y, xt, yt), 2, CFG, 0), {}, "data was"),
                            ((planted, 2, CFG, 0), {"validate": True}, "validate was false in the interrupted run")]:
        with pytest.raises(CheckpointError, match="cannot resume: " + words) as e:
            attribute_to_folder(tmp_path, *args, "planted", resume=True, **kw)
        assert "\n" not in str(e.value) and "start over" in str(e.value)
    assert progress_of(tmp_path)["match"] == [2, 6]  # the refusals left the state as it was


def test_a_damaged_unit_is_one_error(tmp_path, planted):
    _cut(tmp_path, planted)
    path = tmp_path / FOLDER / OFFLINE_JSON
    units = json.loads(path.read_text())["units"]
    (tmp_path / FOLDER / units["target"]["tensors"]).write_bytes(
        (tmp_path / FOLDER / units["clusters"]["tensors"]).read_bytes())  # the target unit holds the clusters
    with pytest.raises(CheckpointError, match=rf"{units['target']['tensors']}: is not the file offline\.json was "
                                              r"saved with \(damaged since: its SHA-256 differs\)"):
        attribute_to_folder(tmp_path, planted, 2, CFG, 0, "planted", resume=True)
    del units["target"]["sha256"]  # a state of before session 40: no digest, its shapes checked
    path.write_text(json.dumps({**json.loads(path.read_text()), "units": units}))
    with pytest.raises(CheckpointError, match=r"cannot resume: the target unit lacks 'final/") as e:
        attribute_to_folder(tmp_path, planted, 2, CFG, 0, "planted", resume=True)
    assert "\n" not in str(e.value) and OFFLINE_JSON in str(e.value)
    path.write_text(json.dumps({**json.loads(path.read_text()), "units": []}))
    with pytest.raises(CheckpointError, match="'units' are not a JSON object"):
        attribute_to_folder(tmp_path, planted, 2, CFG, 0, "planted", resume=True)


def test_a_refusal_of_the_settings_after_the_units_drops_them(tmp_path, planted, monkeypatch):
    """A Hessian that cannot be factorised would stop a resume the same way: nothing is kept to resume."""
    def refuse(*a, **k):
        raise ConfigError("the distilled-set Hessian is not positive definite")
    monkeypatch.setattr(N, "damped_cholesky", refuse)
    with pytest.raises(ConfigError, match="not positive definite"):
        attribute_to_folder(tmp_path / "o", planted, 2, CFG, 0, "planted")
    assert progress_of(tmp_path / "o") is None and not (tmp_path / "o" / FOLDER).exists()


@pytest.mark.parametrize("validate", [False, True])
def test_a_resume_refused_for_its_settings_keeps_the_state(tmp_path, planted, validate):
    """Settings the new run itself refuses (31 samples per cluster: 124 synthetic of 120 training examples) are
    compared with the kept ones first: the refusal names the change and the interrupted run's state survives."""
    _cut(tmp_path, planted, validate=validate)
    other = DDMConfig(clusters_per_class=2, train_steps=5, match_steps=6, samples_per_cluster=31)
    with pytest.raises(CheckpointError, match="samples_per_cluster was 1 in the interrupted run, now 31"):
        attribute_to_folder(tmp_path, planted, 2, other, 0, "planted", validate=validate, resume=True)
    assert progress_of(tmp_path)["match"] == [2, 6]

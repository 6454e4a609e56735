import json
import re

import numpy as np
import pytest

from modelatlas.errors import CheckpointError, ConfigError
from modelatlas.probex import DenseExpert, ProbeXClassifier, ProbeXConfig, fit_probex, load_expert


def check_accuracy(pred, y) -> float:
    return float((np.asarray(pred) == np.asarray(y)).mean())


def test_probex_learns_planted_signal(planted, small_config):
    x, y = planted
    est = ProbeXClassifier(small_config).fit(x[:200], y[:200])
    assert est is not None and est.history_["best_epoch"] >= 0
    assert check_accuracy(est.predict(x[200:]), y[200:]) > 0.9
    assert est.predict_proba(x[200:]).shape == (40, 4)
    assert est.transform(x[200:]).shape == (40, small_config.rank_t)


def test_dense_learns_planted_signal(planted, small_config):
    x, y = planted
    est = DenseExpert(small_config).fit(x[:200], y[:200])
    assert est.config.model == "dense"
    assert check_accuracy(est.predict(x[200:]), y[200:]) > 0.85


def test_same_seed_same_result(planted, small_config):
    x, y = planted
    a = fit_probex(x[:100], y[:100], small_config).predict_proba(x[200:])
    b = fit_probex(x[:100], y[:100], small_config).predict_proba(x[200:])
    assert np.array_equal(a, b)


def test_save_load_round_trip(tmp_path, planted, small_config):
    x, y = planted
    est = ProbeXClassifier(small_config, layer="fc.weight").fit(x[:100], y[:100], classes=list("abcd"))
    est.save(tmp_path / "e")
    again = load_expert(tmp_path / "e")
    assert again.classes_ == list("abcd") and again.layer == "fc.weight"
    assert np.allclose(again.predict_proba(x[200:]), est.predict_proba(x[200:]))
    assert not list((tmp_path / "e").glob("*.pt")) and not list((tmp_path / "e").glob("*.tmp"))
    assert type(again) is ProbeXClassifier


def test_a_dense_expert_reloads_as_one(tmp_path, planted, small_config):
    x, y = planted
    est = DenseExpert(small_config).fit(x[:60], y[:60])
    again = load_expert(est.save(tmp_path / "d"))
    assert type(again) is DenseExpert and again.config.model == "dense"
    assert np.allclose(again.predict_proba(x[200:]), est.predict_proba(x[200:]))


def test_resume_matches_uninterrupted(tmp_path, planted):
    x, y = planted
    full = ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=6, checkpoint_every=3, batch_size=32)
    ref = ProbeXClassifier(full).fit(x[:100], y[:100]).predict_proba(x[200:])
    half = ProbeXConfig(**{**full.to_dict(), "epochs": 3})
    ProbeXClassifier(half).fit(x[:100], y[:100], checkpoint_dir=tmp_path)
    resumed = ProbeXClassifier(full).fit(x[:100], y[:100], checkpoint_dir=tmp_path, resume=True)
    assert resumed.history_["epoch"] == 6 and len(resumed.history_["loss"]) == 6
    assert np.allclose(resumed.predict_proba(x[200:]), ref, atol=1e-5)


def test_resume_with_other_shape_is_refused(tmp_path, planted, small_config):
    x, y = planted
    cfg = ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=2, checkpoint_every=1)
    ProbeXClassifier(cfg).fit(x[:50], y[:50], checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="cannot resume: rank_u was 4 in the interrupted run, now 6"):
        ProbeXClassifier(small_config).fit(x[:50], y[:50], checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="cannot resume: data was"):  # same settings, other data
        ProbeXClassifier(cfg).fit(x[:50, :, :5], y[:50], checkpoint_dir=tmp_path, resume=True)
    state = json.loads((tmp_path / "train_state.json").read_text())
    del state["settings"]["data"]  # a state saved before the data was recorded: the weights' shape still tells
    (tmp_path / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="does not match this expert's shape"):
        ProbeXClassifier(cfg).fit(x[:50, :, :5], y[:50], checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("change, message", [
    ({"seed": 3}, "seed was 0 in the interrupted run, now 3"),
    ({"lr": 2e-3}, "lr was 0.001 in the interrupted run, now 0.002"),
    ({"layer": "fc.weight"}, "layer was 'l' in the interrupted run, now 'fc.weight'"),
    ({"n": 40}, "models was 50 in the interrupted run, now 40"),
    ({"epochs": 1}, "epochs is 1 now, but the interrupted run has already trained 2"),
])
def test_resume_with_other_settings_names_the_key(tmp_path, planted, change, message):
    x, y = planted
    cfg = ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=2, checkpoint_every=1)
    ProbeXClassifier(cfg, "l").fit(x[:50], y[:50], checkpoint_dir=tmp_path)
    other = ProbeXConfig(**{**cfg.to_dict(), **{k: v for k, v in change.items() if k in cfg.to_dict()}})
    n = change.get("n", 50)
    with pytest.raises(CheckpointError, match=f"train_state.json: cannot resume: {re.escape(message)}"):
        ProbeXClassifier(other, change.get("layer", "l")).fit(x[:n], y[:n], checkpoint_dir=tmp_path, resume=True)
    ProbeXClassifier(ProbeXConfig(**{**cfg.to_dict(), "checkpoint_every": 2}), "l").fit(
        x[:50], y[:50], checkpoint_dir=tmp_path, resume=True)  # how often it saves does not matter


def test_resume_of_a_state_without_settings_is_refused(tmp_path, planted):
    x, y = planted
    cfg = ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=2, checkpoint_every=1)
    ProbeXClassifier(cfg).fit(x[:50], y[:50], checkpoint_dir=tmp_path)
    state = json.loads((tmp_path / "train_state.json").read_text())
    del state["settings"]
    (tmp_path / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="does not record its run's settings"):
        ProbeXClassifier(cfg).fit(x[:50], y[:50], checkpoint_dir=tmp_path, resume=True)


def test_wrong_shape_and_labels_named(planted, small_config):
    x, y = planted
    est = ProbeXClassifier(small_config).fit(x[:60], y[:60])
    with pytest.raises(ConfigError, match=r"expects matrices of shape \(12, 10\)"):
        est.predict(np.zeros((2, 5, 5)))
    with pytest.raises(ConfigError, match="multi-hot"):
        ProbeXClassifier(small_config).fit(x[:60], y[:59])


def test_load_missing_folder_names_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a ProbeX expert folder"):
        load_expert(tmp_path)


def test_missing_or_truncated_weights_are_named(tmp_path, planted, small_config):
    from modelatlas.errors import CheckpointError

    x, y = planted
    ProbeXClassifier(small_config).fit(x[:100], y[:100]).save(tmp_path / "e")
    weights = tmp_path / "e" / "expert.safetensors"
    weights.write_bytes(weights.read_bytes()[:30])
    with pytest.raises(CheckpointError, match=r"expert\.safetensors: unreadable \("):
        load_expert(tmp_path / "e")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"expert\.safetensors: missing; not a complete ProbeX expert folder"):
        load_expert(tmp_path / "e")


@pytest.mark.parametrize("key,value", [("param_groups", None), ("loss", None), ("best_score", None),
                                       ("best_score", "high"), ("best_epoch", "3"), ("score", [0.5])])
def test_resume_of_a_state_with_a_missing_or_odd_value_names_it(tmp_path, planted, key, value):
    """A train_state.json without param_groups, loss or best_score (or best_score null) was a KeyError or
    TypeError traceback on --resume; a score list shorter than the epochs went on, misaligned."""
    x, y = planted
    cfg = ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=2, checkpoint_every=1)
    ProbeXClassifier(cfg).fit(x[:50], y[:50], checkpoint_dir=tmp_path)
    state = json.loads((tmp_path / "train_state.json").read_text())
    state.pop(key) if value is None else state.update({key: value})
    (tmp_path / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"train_state\.json: cannot resume: {key} "):
        ProbeXClassifier(ProbeXConfig(**{**cfg.to_dict(), "epochs": 4})).fit(x[:50], y[:50], checkpoint_dir=tmp_path,
                                                                             resume=True)


def _without_best(t):
    return {k: v for k, v in t.items() if not k.startswith("best.")}


def _without_moment(t):
    return {k: v for k, v in t.items() if k != "opt.0.exp_avg_sq"}


def _short_moment(t):
    return {**t, "opt.0.exp_avg": t["opt.0.exp_avg"][:1].contiguous()}


@pytest.mark.parametrize("edit", [_without_best, _without_moment, _short_moment])
def test_resume_of_a_state_missing_tensors_names_the_file(tmp_path, planted, edit):
    """Without the best weights the end of training was a load_state_dict traceback (unless a later epoch
    improved on it); without an Adam moment, or with one of another shape, the first step failed."""
    from safetensors.torch import load_file, save_file

    x, y = planted
    cfg = ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=2, checkpoint_every=1)
    ProbeXClassifier(cfg).fit(x[:50], y[:50], checkpoint_dir=tmp_path)
    save_file(edit(load_file(str(tmp_path / "train_state.safetensors"))), str(tmp_path / "train_state.safetensors"))
    with pytest.raises(CheckpointError, match=r"train_state\.safetensors: .*delete it or train without --resume"):
        ProbeXClassifier(ProbeXConfig(**{**cfg.to_dict(), "epochs": 3})).fit(x[:50], y[:50], checkpoint_dir=tmp_path,
                                                                             resume=True)


def test_resume_on_other_models_of_the_same_count_is_refused(tmp_path, planted):
    """A rebuilt zoo (same trees, counts and classes, other weights) resumed the old zoo's training state
    silently: a finished one came back as the 'new' expert, trained on none of the new models."""
    x, y = planted
    cfg = ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=2, checkpoint_every=1)
    ProbeXClassifier(cfg, "l").fit(x[:50], y[:50], checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot resume: data was '[0-9a-f]{16}' in the interrupted run, now "
                                              r"'[0-9a-f]{16}'"):
        ProbeXClassifier(cfg, "l").fit(x[50:100], y[50:100], checkpoint_dir=tmp_path, resume=True)
    ProbeXClassifier(cfg, "l").fit(x[:50], y[:50], checkpoint_dir=tmp_path, resume=True)  # the same models resume


def test_a_state_whose_two_files_are_from_different_epochs_is_refused(tmp_path, planted):
    """Interrupted between writing the tensors and the JSON, the state held epoch 4's weights and Adam moments
    under epoch 2's JSON; a resume trained epochs 3-4 again from them, silently unlike an uninterrupted run."""
    import shutil

    x, y = planted
    cfg = ProbeXConfig(rank_u=4, rank_v=4, rank_t=4, epochs=4, checkpoint_every=2)
    ProbeXClassifier(ProbeXConfig(**{**cfg.to_dict(), "epochs": 2})).fit(x[:50], y[:50], checkpoint_dir=tmp_path / "a")
    ProbeXClassifier(cfg).fit(x[:50], y[:50], checkpoint_dir=tmp_path / "b")
    shutil.copy(tmp_path / "b" / "train_state.safetensors", tmp_path / "a" / "train_state.safetensors")
    with pytest.raises(CheckpointError, match=r"train_state\.safetensors: cannot resume: it holds epoch 4's state, "
                                              r"train_state\.json epoch 2's \(saving was interrupted\)"):
        ProbeXClassifier(cfg).fit(x[:50], y[:50], checkpoint_dir=tmp_path / "a", resume=True)

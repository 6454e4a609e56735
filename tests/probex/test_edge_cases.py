"""Edge cases of the estimator contract, the router and StatNN (each one a bug that was fixed)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelatlas.errors import CheckpointError, ConfigError
from modelatlas.probex import (
    NotFittedError,
    ProbeXClassifier,
    ProbeXConfig,
    ProbeXTextAligner,
    StatNNClassifier,
    TreeRouter,
    load_expert,
    load_layers,
)


def make_tiny(n=12, shape=(4, 3), labels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = (torch.rand(n, labels, generator=g) < 0.5).int().numpy()
    return x, y


def make_config(**kw):
    return ProbeXConfig(**{"rank_u": 2, "rank_v": 2, "rank_t": 3, "epochs": 2, "batch_size": 4, **kw})


def make_tight_tree(n=40, size=64, spread=1e-4, seed=0):
    """Fine-tunes very close to a root of O(1) weights: where float32 ||a||^2 + ||b||^2 - 2ab cancels."""
    g = torch.Generator().manual_seed(seed)
    root = torch.randn(size, size, generator=g)
    return root + spread * torch.randn(n, size, size, generator=g)


def check_not_fitted(call):
    with pytest.raises(NotFittedError, match="not fitted yet.*call fit"):
        call()


def test_large_val_fraction_keeps_a_training_model():
    x, y = make_tiny(n=3)
    est = ProbeXClassifier(make_config(val_fraction=0.9)).fit(x, y)  # round(2.7) = 3 would leave none
    assert np.isfinite(est.history_["loss"]).all()


def test_methods_before_fit_say_so():
    x, _ = make_tiny()
    check_not_fitted(lambda: ProbeXClassifier().predict(x))
    check_not_fitted(lambda: ProbeXClassifier().save("unused"))
    check_not_fitted(lambda: ProbeXTextAligner().similarity(x))
    check_not_fitted(lambda: TreeRouter().route(x))
    check_not_fitted(lambda: StatNNClassifier().predict({"w": x}))
    assert not hasattr(ProbeXClassifier(), "n_parameters_")  # still an AttributeError for hasattr


def test_class_names_must_match_the_labels():
    x, y = make_tiny()
    with pytest.raises(ConfigError, match="classes names 3 classes but labels have d_Y=2"):
        ProbeXClassifier(make_config()).fit(x, y, classes=["a", "b", "c"])
    with pytest.raises(ConfigError, match="classes names 1 prompts but there are 2 text embeddings"):
        ProbeXTextAligner(make_config()).fit(x, np.arange(12) % 2, torch.randn(2, 5), classes=["a"])
    with pytest.raises(ConfigError, match=r"range -1\.\.1"):
        ProbeXTextAligner(make_config()).fit(x, np.arange(12) % 2 - 1 * (np.arange(12) == 0), torch.randn(2, 5))


def test_one_training_model_does_not_blow_up_inputs():
    x, y = make_tiny()
    est = ProbeXClassifier(make_config(val_fraction=0.0)).fit(x[:1], y[:1])
    assert est.scale_ == 1.0  # no spread to measure: a scale of 1e-12 made every later input 1e12 times larger
    proba = est.predict_proba(x[1:])
    assert ((proba > 0) & (proba < 1)).all()


def test_conv_kernels_are_read_as_matrices():
    g = torch.Generator().manual_seed(0)
    kernels = torch.randn(10, 4, 2, 3, 3, generator=g)  # (B, out, in, k, k)
    y = (torch.rand(10, 2, generator=g) < 0.5).int().numpy()
    est = ProbeXClassifier(make_config()).fit(kernels, y)
    assert est.shape_ == (4, 18)
    assert np.array_equal(est.predict_proba(kernels), est.predict_proba(kernels.reshape(10, 4, 18)))
    with pytest.raises(ConfigError, match=r"one weight matrix per model, shape \(B, d_H, d_W\); got shape \(10, 4\)"):
        ProbeXClassifier(make_config()).fit(torch.randn(10, 4), y)


def test_fit_and_load_leave_the_global_rng_alone(tmp_path):
    x, _ = make_tiny()
    text = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    est = ProbeXTextAligner(make_config()).fit(x, np.arange(12) % 3, text)
    load_expert(est.save(tmp_path / "e"))
    assert torch.equal(torch.rand(3), expected)
    again = ProbeXTextAligner(make_config()).fit(x, np.arange(12) % 3, text)
    assert np.array_equal(again.similarity(x), est.similarity(x))  # same seed, same result (G included)


def test_load_with_mismatched_files_names_the_folder(tmp_path):
    x, y = make_tiny()
    ProbeXClassifier(make_config()).fit(x, y).save(tmp_path / "e")
    meta_path = tmp_path / "e" / "expert.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "classes": ["a", "b", "c"]}))
    with pytest.raises(CheckpointError, match=r"e: expert\.json and expert\.safetensors do not match \(RuntimeError"):
        load_expert(tmp_path / "e")


@pytest.mark.parametrize("scale", [0, -0.5, float("nan"), float("inf")])
def test_load_refuses_a_scale_that_makes_every_prediction_nonsense(tmp_path, scale):
    """A hand-edited scale of 0 loaded, and every input divided by it gave NaN: "no class above 0.5" for all."""
    x, y = make_tiny()
    ProbeXClassifier(make_config()).fit(x, y).save(tmp_path / "e")
    meta_path = tmp_path / "e" / "expert.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "scale": scale}))
    with pytest.raises(CheckpointError, match=r"expert\.json: scale must be a positive number .*; got "):
        load_expert(tmp_path / "e")


def test_router_refuses_mismatched_ids_names_and_shapes(tmp_path):
    x = torch.randn(4, 2, 3)
    with pytest.raises(ConfigError, match="one tree id per model.*trees has 2 entries"):
        TreeRouter().fit(x, ["a", "b"])  # reshape(2, -1) used to regroup 4 models into 2
    router = TreeRouter().fit(x, ["a", "a", "b", "b"])
    with pytest.raises(ConfigError, match="route got 1 names for 3 models"):
        router.route(x[:3], ["only"])
    again = TreeRouter.load(router.save(tmp_path))
    with pytest.raises(ConfigError, match=r"router expects models of shape \(2, 3\); got \(3, 2\)"):
        again.route(x.transpose(1, 2))  # as many weights, another layer
    assert [r.tree for r in again.route(x[0])] == ["a"]  # one model, without its batch axis


def test_router_radius_is_exact_for_tight_trees():
    x = make_tight_tree()
    router = TreeRouter().fit(x, ["t"] * len(x))
    centroid = x.double().mean(0)
    true_max = float((x.double() - centroid).flatten(1).norm(dim=1).max())
    assert float(router.radii_[0]) == pytest.approx(1.5 * true_max, rel=1e-3)
    direction = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(1)).double()
    stranger = centroid + 3 * true_max * direction / direction.norm()  # twice the radius away
    assert not router.route(stranger[None])[0].known
    assert all(r.known for r in router.route(x))


def test_statnn_label_constant_in_training():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, 3, generator=g)
    y = np.stack([np.ones(20), np.arange(20) % 2], 1).astype(int)  # label 0 was in every training set
    est = StatNNClassifier(max_iter=5).fit({"w": x}, y)
    assert np.array_equal(est.predict_proba({"w": x})[:, 0], np.ones(20))
    assert np.array_equal(est.predict({"w": x})[:, 0], np.ones(20))


@pytest.mark.parametrize("field,value", [("weight_decay", float("nan")), ("lr", "0.1"), ("lr", float("inf")),
                                         ("relu", "false"), ("center", 1), ("seed", 1.5)])
def test_config_refuses_wrong_types_and_non_finite(field, value):
    with pytest.raises(ConfigError, match=f"ProbeXConfig.{field} must be"):
        ProbeXConfig(**{field: value})


def test_config_refuses_a_seed_torch_cannot_take():
    """`atlas probex train --seed 99999999999999999999` was an overflow traceback once training began."""
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ConfigError, match=r"ProbeXConfig.seed \(--seed\) must be from -2\*\*63 to 2\*\*64 - 1"):
            ProbeXConfig(seed=seed)
    for seed in (2**64 - 1, -(2**63)):  # the ends of the range train, past the first epoch's seed too
        ProbeXClassifier(ProbeXConfig(rank_u=2, rank_v=2, rank_t=2, epochs=2, seed=seed)).fit(*make_tiny())


def test_load_layers_names_the_model_with_another_shape(tmp_path):
    save_file({"w": torch.zeros(3, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(4, 3)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"b\.safetensors: layer 'w' has shape \(4, 3\)"):
        load_layers([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], ["w"])


def test_load_layers_on_a_bias_names_no_cli_option(tmp_path):
    save_file({"b": torch.zeros(4)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ConfigError, match=r"layer 'b' has shape \(4,\).*pick a weight") as info:
        load_layers([tmp_path / "a.safetensors"], ["b"])
    assert "--" not in str(info.value)  # a library error; the CLI may add its flag


@pytest.mark.parametrize("key,edit", [("module.probes", lambda t: t.fill_(float("nan"))),
                                      ("mean", lambda t: t.fill_(float("inf")))])
def test_load_refuses_saved_weights_that_are_not_finite(tmp_path, key, edit):
    """NaN in a saved expert's weights or mean loaded, and every prediction was NaN ("no class above 0.5")."""
    from safetensors.torch import load_file

    x, y = make_tiny()
    ProbeXClassifier(make_config()).fit(x, y).save(tmp_path / "e")
    tensors = load_file(str(tmp_path / "e" / "expert.safetensors"))
    edit(tensors[key])
    save_file(tensors, str(tmp_path / "e" / "expert.safetensors"))
    with pytest.raises(CheckpointError, match=rf"expert\.safetensors: tensor '{key}' holds NaN or inf values"):
        load_expert(tmp_path / "e")


def test_load_reads_weights_saved_in_another_float_dtype(tmp_path):
    """A mean saved in float64 (written by another tool) loaded, then predict failed in a matmul of mixed dtypes."""
    from safetensors.torch import load_file

    x, y = make_tiny()
    est = ProbeXClassifier(make_config()).fit(x, y)
    est.save(tmp_path / "e")
    tensors = load_file(str(tmp_path / "e" / "expert.safetensors"))
    save_file({k: v.double() for k, v in tensors.items()}, str(tmp_path / "e" / "expert.safetensors"))
    assert np.allclose(load_expert(tmp_path / "e").predict_proba(x), est.predict_proba(x), atol=1e-6)


@pytest.mark.parametrize("edit,why", [(lambda y: y * 2, "only 0 and 1"), (lambda y: np.where(y > 0, np.nan, 0.0), "only 0 and 1"),
                                      (lambda y: y[:, :0], "at least one class")])
def test_fit_refuses_labels_that_are_not_multi_hot(edit, why):
    """Class indices or counts (2) and NaN trained silently against BCE targets outside [0, 1]; no column at all
    failed deep in the loss with a shape error."""
    x, y = make_tiny()
    with pytest.raises(ConfigError, match=rf"labels must be \(B, d_Y\) multi-hot.*{why}"):
        ProbeXClassifier(make_config()).fit(x, edit(y))


def test_load_refuses_a_text_expert_with_fewer_prompt_names_than_prompts(tmp_path):
    """expert.json naming 2 of 3 prompts loaded; the atlas's and `probex predict`'s descriptions then failed
    with an IndexError on the missing name."""
    x, _ = make_tiny()
    ProbeXTextAligner(make_config()).fit(x, np.arange(12) % 3, np.eye(3, 5), ["a", "b", "c"]).save(tmp_path / "t")
    meta_path = tmp_path / "t" / "expert.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "classes": ["a", "b"]}))
    with pytest.raises(CheckpointError, match=r"do not match .*2 prompt names for 3 text embeddings"):
        load_expert(tmp_path / "t")


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (3, 0, 2, 2)])
def test_an_empty_layer_is_refused_naming_it(tmp_path, shape):
    # (0, 4) ended in torch's "cannot reshape tensor of 0 elements"; (4, 0) gave an empty matrix to train on
    save_file({"w": torch.zeros(shape)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ConfigError, match=r"layer 'w' has shape .* and no values; ProbeX needs a matrix"):
        load_layers([tmp_path / "a.safetensors"], ["w"])


def test_zero_models_fit_is_refused_and_predict_returns_no_rows():
    """X with no models was a reshape RuntimeError ("0 elements ... ambiguous") in fit and in predict."""
    x, y = make_tiny()
    with pytest.raises(ConfigError, match="no models given"):
        ProbeXClassifier(make_config()).fit(x[:0], y[:0])
    est = ProbeXClassifier(make_config()).fit(x, y)
    assert est.predict_proba(x[:0]).shape == (0, 2) and est.predict(x[:0]).shape == (0, 2)
    assert est.transform(x[:0]).shape == (0, 3)


def test_router_with_no_models():
    """Fitting on no models, or routing none, was a reshape RuntimeError ('0 elements ... ambiguous')."""
    with pytest.raises(ConfigError, match="router fit needs at least one model"):
        TreeRouter().fit(torch.zeros(0, 4, 3), [])
    router = TreeRouter().fit(torch.randn(4, 4, 3), ["a", "a", "b", "b"])
    assert router.route(torch.zeros(0, 4, 3)) == [] and router.route(torch.zeros(0, 4, 3), []) == []


def test_text_predict_with_prompts_of_another_width_names_both():
    """Zero-shot prompts from another text encoder (width 5, trained on 3) were a matmul RuntimeError."""
    x, _ = make_tiny()
    est = ProbeXTextAligner(make_config()).fit(x, np.arange(12) % 3, np.eye(3))
    with pytest.raises(ConfigError, match="text embeddings have width 5, but this expert was trained on .* width 3"):
        est.predict(x, np.ones((2, 5)))
    assert est.predict(x, np.eye(3)[:2]).shape == (12,)


def test_text_fit_refuses_text_embeddings_that_are_not_finite():
    """NaN prompt embeddings trained silently: every loss NaN, and the untrained start kept as the 'best' state."""
    x, _ = make_tiny()
    text = np.eye(3)
    text[1, 0] = np.nan
    with pytest.raises(ConfigError, match=r"text embedding 1 holds NaN or inf"):
        ProbeXTextAligner(make_config()).fit(x, np.arange(12) % 3, text)


def test_load_refuses_a_mean_of_another_shape_than_the_expert(tmp_path):
    """A saved mean of shape (2, 3) beside a (4, 3) expert loaded; predict then blamed the right-shaped models
    ("expects matrices of shape (2, 3)"), and (2, 3) inputs failed in a matmul."""
    from safetensors.torch import load_file

    x, y = make_tiny()
    ProbeXClassifier(make_config()).fit(x, y).save(tmp_path / "e")
    tensors = load_file(str(tmp_path / "e" / "expert.safetensors"))
    tensors["mean"] = tensors["mean"][:2].contiguous()
    save_file(tensors, str(tmp_path / "e" / "expert.safetensors"))
    with pytest.raises(CheckpointError, match=r"do not match .*mean has shape \(2, 3\), the expert \(4, 3\)"):
        load_expert(tmp_path / "e")


@pytest.mark.parametrize("labels,got", [(["a", "b", "c"] * 4, "strings"), ([0.5, 1, 2] * 4, "0.5")])
def test_text_fit_refuses_labels_that_are_not_indices(labels, got):
    """Prompts as labels (the natural mistake) were a numpy.str_ TypeError; 0.5 was truncated to class 0."""
    x, _ = make_tiny()
    with pytest.raises(ConfigError, match=rf"labels must be integer indices into the 3 text embeddings.*{got}"):
        ProbeXTextAligner(make_config()).fit(x, labels, np.eye(3))


@pytest.mark.parametrize("y", [[["1", "0"]] * 12, [[1, 0], [1]] * 6])
def test_fit_refuses_labels_that_are_not_numbers(y):
    """Class names as labels were a numpy.str_ TypeError, and ragged rows numpy's 'inhomogeneous shape'."""
    x, _ = make_tiny()
    with pytest.raises(ConfigError, match=r"labels must be \(B, d_Y\) multi-hot.*numbers"):
        ProbeXClassifier(make_config()).fit(x, y)

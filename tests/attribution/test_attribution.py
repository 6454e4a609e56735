import json

import pytest
import torch

from modelatlas.attribution import DDMConfig, ddm_attribution, spearman_scores, within_class_spearman
from modelatlas.attribution.clusters import cluster_per_class
from modelatlas.attribution.report import cluster_means, top_clusters
from modelatlas.attribution.validate import loo_attribution
from modelatlas.cli.main import main
from modelatlas.errors import ConfigError


def test_clustering_shapes(planted):
    x, y, _, _ = planted
    assign, cc = cluster_per_class(x, y, 2, 2, seed=0)
    assert assign.shape == (120,) and cc.tolist() == [0, 0, 1, 1]
    assert torch.equal(cc[assign], y)  # every example's cluster belongs to its class
    assert sorted(torch.bincount(assign).tolist()) == [30, 30, 30, 30]  # the planted blobs are found
    with pytest.raises(ConfigError, match="fewer than clusters_per_class"):
        cluster_per_class(x[:3], y[:3], 2, 2)
    # 60 examples of class 0 only (the first 60 of data read class by class): the message says what to change
    with pytest.raises(ConfigError, match=r"class 1 has 0 of the 60 training examples, fewer than "
                                          r"clusters_per_class=2; give the class training examples, or train "
                                          r"on more data \(--max-train\)"):  # lowering it cannot help a class of 0
        cluster_per_class(x[:60], y[:60], 2, 2)


def make_repeated_class(planted):
    """Class 0 is one image repeated 5 times (e.g. a deduplicated-away augmentation); class 1 is varied."""
    x, y, xt, yt = planted
    return torch.cat([x[:1].repeat(5, 1, 1, 1), x[-5:]]), torch.tensor([0] * 5 + [1] * 5), xt, yt


@pytest.mark.parametrize("unlearn", ["newton", "ascent"])
def test_class_with_fewer_distinct_examples_than_clusters_is_refused(planted, unlearn):
    # k-means left a cluster empty: its mean image was 0/0, and the NaN spread to the whole matrix (ascent)
    # or was reported as a diverged target model (newton)
    x, y, xt, yt = make_repeated_class(planted)
    cfg = DDMConfig(clusters_per_class=2, train_steps=5, checkpoints=1, match_steps=1, unlearn=unlearn)
    with pytest.raises(ConfigError, match="class 0 has only 1 distinct examples, fewer than clusters_per_class=2"):
        ddm_attribution(x, y, xt, yt, 2, cfg)


def test_one_class_in_one_cluster_is_refused_by_newton(planted):
    # removing the only cluster removes all the data: the Newton share n_k / (N - n_k) was 1 / 0 -> NaN matrix
    x, y, xt, yt = planted
    one = DDMConfig(clusters_per_class=1, train_steps=5, checkpoints=1, match_steps=1)
    with pytest.raises(ConfigError, match="clusters_per_class"):
        ddm_attribution(x[y == 0], y[y == 0], xt[yt == 0], yt[yt == 0], 1, one)
    two = DDMConfig(clusters_per_class=2, train_steps=5, checkpoints=1, match_steps=1)
    assert torch.isfinite(ddm_attribution(x[y == 0], y[y == 0], xt[yt == 0], yt[yt == 0], 1, two).matrix).all()


def test_float64_images_and_int32_labels_give_the_float32_result(planted):
    # data converted from NumPy is float64: training failed with "mat1 and mat2 must have the same dtype"
    x, y, xt, yt = planted
    cfg = DDMConfig(clusters_per_class=2, train_steps=5, checkpoints=1, match_steps=1)
    ref = ddm_attribution(x, y, xt, yt, 2, cfg)
    got = ddm_attribution(x.double(), y.int(), xt.double(), yt.int(), 2, cfg)
    assert torch.equal(got.matrix, ref.matrix)
    loo, _ = loo_attribution(x.double(), y.int(), xt.double(), yt.int(), 2, ref.assign, cfg)
    assert torch.equal(loo, loo_attribution(x, y, xt, yt, 2, ref.assign, cfg)[0])


def test_labels_outside_num_classes_are_named(planted):
    x, y, xt, yt = planted
    cfg = DDMConfig(clusters_per_class=2, train_steps=5, checkpoints=1, match_steps=1)
    with pytest.raises(ConfigError, match=r"y holds labels from 0 to 1, outside 0..0 for num_classes=1"):
        ddm_attribution(x, y, xt, yt, 1, cfg)
    with pytest.raises(ConfigError, match=r"y_test holds labels from -1 to 1"):
        ddm_attribution(x, y, xt, torch.where(yt == 0, -1, yt), 2, cfg)


@pytest.mark.parametrize("unlearn", ["newton", "ascent"])
def test_unlearning_raises_loss_of_the_clusters_own_test_points(planted, unlearn):
    x, y, xt, yt = planted
    cfg = DDMConfig(clusters_per_class=2, width=8, lr=0.5, train_steps=40, checkpoints=4, match_steps=20,
                    unlearn_lr=5.0, unlearn=unlearn)
    attr = ddm_attribution(x, y, xt, yt, 2, cfg, seed=0)
    assert attr.matrix.shape == (4, 20) and attr.synthetic.shape == (4, 1, 2, 2)
    assign_test = torch.arange(4).repeat_interleave(5)  # test blob b was drawn from centre b
    blob_of_cluster = [int(torch.mode(torch.argmax(x.reshape(-1, 4)[attr.assign == k], 1)).values) for k in range(4)]
    for k in range(4):
        own = attr.matrix[k, assign_test == blob_of_cluster[k]].mean()
        assert own > 0  # removing a cluster hurts its own test points
        assert own > attr.matrix[k, assign_test != blob_of_cluster[k]].mean()
    assert attr.match_losses[-1] < attr.match_losses[0]


def test_spearman_and_report_helpers():
    a = torch.randn(5, 7)
    s = spearman_scores(a, 2 * a + 1)
    assert s["flattened"] == pytest.approx(1.0) and s["per_test_mean"] == pytest.approx(1.0)
    cc, yt = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1])
    true = torch.tensor([[1., 5.], [2., 4.], [3., 6.], [9., 1.], [8., 2.], [7., 3.]])
    pred = true.clone()
    pred[:3, 0] = torch.tensor([3., 2., 1.])  # reversed inside class 0 for test sample 0
    assert within_class_spearman(pred, true, cc, yt) == pytest.approx(0.0)  # (-1 + 1) / 2
    helpful, harmful = top_clusters(torch.tensor([[0.1], [-0.5], [0.9]]), 0, 1)
    assert helpful == [2] and harmful == [1]
    m = cluster_means(torch.arange(4.).view(4, 1, 1, 1), torch.tensor([0, 0, 1, 1]), 2)
    assert m.flatten().tolist() == [0.5, 2.5]


def test_cli_attribute_tiny(tmp_path, capsys, monkeypatch):
    out = tmp_path / "att"
    argv = ["attribute", "--dataset", "digits", "--clusters-per-class", "2", "--out", str(out), "--test-index", "0",
            "3", "--max-train", "200", "--max-test", "20", "--train-steps", "10", "--match-steps", "2",
            "--samples-per-cluster", "2"]
    assert main(argv) == 0
    assert "attribution matrix 20 clusters x 20 test samples" in capsys.readouterr().out
    info = json.loads((out / "attribution.json").read_text())
    assert info["shape"] == [20, 20] and (out / "attribution.png").stat().st_size > 1000
    import hashlib  # the JSON, written last, names the digests of the two other files (a mixed set shows)
    assert info["files"] == {n: hashlib.sha256((out / n).read_bytes()).hexdigest()
                             for n in ("attribution.safetensors", "attribution.png")}
    from safetensors.torch import load_file
    assert load_file(str(out / "attribution.safetensors"))["matrix"].shape == (20, 20)
    monkeypatch.delenv("ATLAS_DEBUG", raising=False)
    assert main([*argv[:-8], "--test-index", "99", "--max-test", "20"]) == 1
    assert "--test-index 99 is out of range: --max-test 20 keeps 20 test samples (0 to 19)" in capsys.readouterr().err
    one = [a for a in argv if a not in ("0", "3")][:-8]  # no --test-index: the default fits one test sample
    assert main([*one[:one.index("--test-index")], *one[one.index("--test-index") + 1:], "--max-test", "1",
                 "--max-train", "200", "--train-steps", "5", "--match-steps", "1"]) == 0
    assert json.loads((out / "attribution.json").read_text())["shape"] == [20, 1]


def test_cli_validation_json_is_strict_with_two_clusters_per_class(tmp_path, capsys):
    out = tmp_path / "att"
    assert main(["attribute", "--dataset", "digits", "--clusters-per-class", "2", "--out", str(out), "--max-train",
                 "200", "--max-test", "20", "--train-steps", "10", "--match-steps", "2", "--validate"]) == 0
    assert "within class n/a (fewer than 3 clusters per class)" in capsys.readouterr().out

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    info = json.loads((out / "attribution.json").read_text(), parse_constant=refuse)  # no bare NaN
    assert info["validation"]["within_class"] is None


def test_cli_data_root_reaches_the_loader(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray((rng.random((8, 8)) * 255).astype("uint8")).save(tmp_path / "imgs" / c / f"{i}.png")
    assert main(["attribute", "--dataset", "image-folder", "--data-root", str(tmp_path / "imgs"), "--out",
                 str(tmp_path / "o"), "--clusters-per-class", "2", "--train-steps", "2", "--match-steps", "1",
                 "--test-index", "0", "--unlearn", "ascent"]) == 0
    assert "attribution matrix 4 clusters x 3 test samples" in capsys.readouterr().out  # 16 images, 20 % test


def test_newton_on_a_target_too_large_for_its_hessian_is_refused_up_front():
    x, y = torch.randn(20, 1, 30, 30), torch.arange(20) % 2  # 900 inputs x width 32: 28,898 parameters
    with pytest.raises(ConfigError, match=r"exact 28,898 x 28,898 Hessian .* use unlearn='cg' .*, or unlearn='auto'"):
        ddm_attribution(x, y, x[:4], y[:4], 2, DDMConfig(clusters_per_class=2, unlearn="newton"))


def test_config_errors():
    with pytest.raises(ConfigError, match="clusters_per_class must be >= 1"):
        DDMConfig(clusters_per_class=0)
    with pytest.raises(ConfigError, match="unlearn_lr must be > 0"):
        DDMConfig(unlearn_lr=0)


@pytest.mark.parametrize("kwargs, match", [
    # NaN/inf passed and failed later as "the distilled-set Hessian has NaN/inf entries ... lower lr"
    ({"weight_decay": float("nan")}, "weight_decay must be >= 0 and finite, got nan"),
    ({"weight_decay": float("inf")}, "weight_decay must be >= 0 and finite, got inf"),
    ({"damping": float("inf")}, "damping must be > 0 and finite, got inf"),  # said 'raise damping'
    ({"lr": float("inf")}, "lr must be > 0 and finite"),
    ({"clusters_per_class": 2.5}, r"clusters_per_class must be >= 1 \(an integer\), got 2.5"),
    ({"train_steps": "10"}, r"train_steps must be >= 1 \(an integer\), got '10'"),  # was a TypeError
    ({"match_steps": True}, r"match_steps must be >= 0 \(an integer\), got True"),
    ({"match_final": "no"}, "match_final must be true or false"),
    ({"train_steps": 10**11}, "train_steps must be at most 1,000,000, got 100,000,000,000"),  # ran silently for hours
    ({"damping": 1e308}, "damping must be at most 1e[+]20, got 1e[+]308"),  # overflowed to 'even with damping inf'
])
def test_config_values_of_the_wrong_kind_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DDMConfig(**kwargs)


def test_more_synthetic_samples_than_training_examples_is_refused_up_front(planted):
    x, y, xt, yt = planted  # 120 training examples, 2 classes
    with pytest.raises(ConfigError, match=r"samples_per_cluster=1000000000 x 4 clusters = 4,000,000,000 synthetic "
                                          r"samples, more than the 120 training examples .*lower clusters_per_class or samples_per_cluster "
                                          r"\(--clusters-per-class"):
        ddm_attribution(x, y, xt, yt, 2, DDMConfig(clusters_per_class=2, samples_per_cluster=10**9))


@pytest.mark.parametrize("unlearn", ["newton", "ascent"])
def test_a_diverged_target_model_is_refused(planted, unlearn):
    """--unlearn ascent --weight-decay 1e10: the target's weights were NaN and the run wrote an all-NaN matrix
    (and NaN matching losses) with exit code 0; Newton refused it only after the matching, at the Hessian."""
    x, y, xt, yt = planted
    cfg = DDMConfig(clusters_per_class=2, train_steps=3, checkpoints=1, match_steps=1, unlearn=unlearn,
                    weight_decay=1e10)
    with pytest.raises(ConfigError, match=r"DDM: the target model diverged \(NaN/inf losses after 3 steps\); lower "
                                          r"its learning rate, train_steps or weight_decay \(--train-steps"):
        ddm_attribution(x, y, xt, yt, int(y.max()) + 1, cfg)

import numpy as np
import pytest
import torch

from modelatlas.errors import ConfigError
from modelatlas.probex import (
    NotInAnyTreeError,
    ProbeXConfig,
    ProbeXTextAligner,
    StatNNClassifier,
    TreeRouter,
    layer_statistics,
    load_expert,
)
from modelatlas.probex.router import cluster_trees


def make_trees(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    roots = torch.randn(3, 6, 5, generator=g) * 3
    x = torch.cat([roots[k] + 0.1 * torch.randn(n, 6, 5, generator=g) for k in range(3)])
    return x, [f"tree{k}" for k in range(3) for _ in range(n)], roots


def test_router_sends_to_nearest_tree(tmp_path):
    x, trees, roots = make_trees()
    router = TreeRouter().fit(x, trees)
    new = roots + 0.1 * torch.randn(3, 6, 5)
    assert router.route_strict(new, ["a", "b", "c"]) == ["tree0", "tree1", "tree2"]
    again = TreeRouter.load(router.save(tmp_path))
    assert [r.tree for r in again.route(new)] == ["tree0", "tree1", "tree2"]


def test_router_trees_from_lineage_clustering():
    x, trees, roots = make_trees(n=10)
    labels = cluster_trees(x)
    assert len(set(labels.tolist())) == 3
    assert all(len(set(labels[i * 10:(i + 1) * 10].tolist())) == 1 for i in range(3))
    router = TreeRouter().fit(x)  # no labels: clustered
    assert len({r.tree for r in router.route(roots)}) == 3


def test_router_rejects_out_of_tree_model():
    x, trees, _ = make_trees()
    router = TreeRouter().fit(x, trees)
    stranger = torch.randn(1, 6, 5) * 3
    (res,) = router.route(stranger, ["stranger"])
    assert not res.known and res.distance > res.radius
    with pytest.raises(NotInAnyTreeError, match=r"stranger belongs to no known tree: nearest tree 'tree\d' is at distance"):
        router.route_strict(stranger, ["stranger"])
    with pytest.raises(ConfigError, match="slack"):
        TreeRouter(slack=0.5)


def test_one_model_tree_gets_the_other_trees_relative_radius():
    x, trees, roots = make_trees()
    lone = roots[0] * -1.0  # a fourth tree of one model, as far from the others as they are from each other
    router = TreeRouter().fit(torch.cat([x, lone[None]]), trees + ["lone"])
    k = router.trees_.index("lone")
    others = [router.radii_[i] / router.centroids_[i].double().norm() for i in range(3)]
    assert float(router.radii_[k]) == pytest.approx(float(torch.stack(others).median() * lone.double().norm()), rel=1e-5)
    near = lone + 0.1 * torch.randn(6, 5, generator=torch.Generator().manual_seed(5))  # a fine-tune of it
    far = torch.randn(6, 5, generator=torch.Generator().manual_seed(6)) * 3
    assert [r.tree for r in router.route(torch.stack([near, far]))] == ["lone", None]
    assert float(TreeRouter().fit(lone[None], ["lone"]).radii_[0]) == 0.0  # no tree to borrow a spread from


def test_statnn_features_and_fit():
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    f = layer_statistics({"w": t})
    assert f.shape == (1, 9)
    assert np.allclose(f[0, :7], [2.5, 1.25, 1, 1.75, 2.5, 3.25, 4])
    x = torch.randn(80, 4, 4)
    y = np.stack([(x.std((1, 2)) > 1).numpy(), np.zeros(80)], 1).astype(int)  # label 0: a statistic
    y[::2, 1] = 1
    est = StatNNClassifier(max_iter=20).fit({"w": x}, y)
    assert est.predict({"w": x}).shape == (80, 2)
    assert est.predict_proba({"w": x}).shape == (80, 2)


def test_statnn_features_blocked_equal_one_pass(monkeypatch):
    """Models are reduced in blocks to bound memory; each model's statistics are its own, so the blocks
    change no value (float16 input is converted per block)."""
    import modelatlas.probex.statnn as statnn

    x = {"a": torch.randn(7, 6, 5, generator=torch.Generator().manual_seed(0)).half(), "b": torch.rand(7, 3)}
    whole = layer_statistics(x)
    monkeypatch.setattr(statnn, "_BLOCK", 31)  # 1 model per block for "a" (30 weights), 10 for "b"
    assert np.array_equal(layer_statistics(x), whole)
    assert whole.shape == (7, 18) and np.isfinite(whole).all()


def test_text_zero_shot_on_synthetic_problem(tmp_path, text_problem):
    x, labels, text = text_problem
    seen = labels < 16
    cfg = ProbeXConfig(rank_u=8, rank_v=8, rank_t=8, epochs=60, lr=2e-3, batch_size=32)
    est = ProbeXTextAligner(cfg).fit(x[seen], labels[seen], text[:16])
    unseen_pred = est.predict(x[~seen], text[16:]) + 16
    zero_shot = (unseen_pred == labels[~seen]).mean()
    assert zero_shot > 3 * (1 / 8), zero_shot
    first = [labels[~seen][est.search(x[~seen], text[c])[0]] for c in range(16, 24)]
    assert np.mean(np.array(first) == np.arange(16, 24)) > 0.5  # most unseen queries find their class first
    again = load_expert(est.save(tmp_path / "t"))
    assert np.allclose(again.similarity(x[:5]), est.similarity(x[:5]), atol=1e-6)


def test_a_query_that_is_a_known_prompt_is_not_counted_twice(text_problem):
    x, labels, text = text_problem
    cfg = ProbeXConfig(rank_u=8, rank_v=8, rank_t=8, epochs=60, lr=2e-3, batch_size=32)
    est = ProbeXTextAligner(cfg).fit(x[labels < 16], labels[labels < 16], text[:16])
    threes = x[labels == 3]
    scores = est.search_scores(threes, text[3], reference=text[:16])
    others = np.delete(text[:16], 3, axis=0)  # the same query scored against the other 15 prompts
    np.testing.assert_allclose(scores, est.search_scores(threes, text[3], reference=others), rtol=1e-6)
    assert scores.max() > np.log(0.5)  # with its twin in the softmax a query could not exceed log(1/2)


def make_statnn(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 4, 4, generator=g) * (1 + torch.rand(60, 1, 1, generator=g))
    y = np.stack([(x.std((1, 2)) > 1.5).numpy(), (x.mean((1, 2)) > 0).numpy()], 1).astype(int)
    return StatNNClassifier(max_iter=15, seed=seed).fit({"w": x}, y), x


def test_statnn_saves_and_loads_without_pickle(tmp_path):
    pytest.importorskip("skops")
    est, x = make_statnn()
    est.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["statnn.json", "statnn.skops"]
    back = StatNNClassifier.load(tmp_path / "s")
    assert np.array_equal(back.predict_proba({"w": x}), est.predict_proba({"w": x}))
    assert back.max_iter == 15 and back.n_features_ == est.n_features_


def test_statnn_refuses_a_model_file_with_other_types(tmp_path):
    sio = pytest.importorskip("skops.io")
    from fractions import Fraction

    from modelatlas.errors import CheckpointError
    est, _ = make_statnn()
    est.save(tmp_path / "s")
    sio.dump({"model": Fraction(1, 3)}, str(tmp_path / "s" / "statnn.skops"))  # a file naming an unlisted type
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        StatNNClassifier.load(tmp_path / "s")
    (tmp_path / "s" / "statnn.skops").unlink()
    with pytest.raises(CheckpointError, match="missing statnn.skops"):
        StatNNClassifier.load(tmp_path / "s")


def test_statnn_predict_refuses_other_layers_or_another_order(tmp_path):
    """Statistics of other layers (or the same ones in another order) were fed to the fitted boosting models
    silently, as long as their count matched; another count was scikit-learn's feature-count ValueError."""
    from modelatlas.probex import StatNNClassifier

    g = torch.Generator().manual_seed(0)
    layers = {"a": torch.randn(12, 4, 3, generator=g), "b": torch.randn(12, 5, generator=g)}
    y = (torch.rand(12, 2, generator=g) < 0.5).int().numpy()
    est = StatNNClassifier(max_iter=5).fit(layers, y)
    for other in ({"b": layers["b"], "a": layers["a"]}, {"a": layers["a"], "c": layers["b"]}, {"a": layers["a"]}):
        with pytest.raises(ConfigError, match=r"StatNN was fitted on layers \['a', 'b'\]"):
            est.predict(other)
    pytest.importorskip("skops")
    again = StatNNClassifier.load(est.save(tmp_path))
    with pytest.raises(ConfigError, match=r"fitted on layers \['a', 'b'\]; got \['b', 'a'\]"):
        again.predict_proba({"b": layers["b"], "a": layers["a"]})
    assert np.array_equal(again.predict(layers), est.predict(layers))


@pytest.mark.parametrize("text,words", [("{", r"statnn\.json: cannot read"), ("[1]", r"statnn\.json: not StatNN's settings"),
                                        ('{"format": "modelatlas-statnn/1"}', r"statnn\.json: max_iter must be"),
                                        ('{"format": "modelatlas-statnn/1", "max_iter": 5, "seed": "x", "n_features": 9}',
                                         r"statnn\.json: seed must be an integer; got 'x'")])
def test_statnn_load_names_statnn_json_and_its_key(tmp_path, text, words):
    """A truncated statnn.json was blamed on statnn.skops; a JSON list, a missing key or a seed of 'x' were
    AttributeError, KeyError and ValueError tracebacks."""
    pytest.importorskip("skops")
    from modelatlas.errors import CheckpointError

    make_statnn()[0].save(tmp_path / "s")
    (tmp_path / "s" / "statnn.json").write_text(text)
    with pytest.raises(CheckpointError, match=words):
        StatNNClassifier.load(tmp_path / "s")


def test_statnn_load_of_a_truncated_model_file_names_it(tmp_path):
    """A statnn.skops cut short (an interrupted copy) was a zipfile.BadZipFile traceback."""
    pytest.importorskip("skops")
    from modelatlas.errors import CheckpointError

    make_statnn()[0].save(tmp_path / "s")
    model = tmp_path / "s" / "statnn.skops"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"statnn\.skops: cannot read StatNN model"):
        StatNNClassifier.load(tmp_path / "s")

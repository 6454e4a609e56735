import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.distill import EvalProtocol, SyntheticSet, evaluate_random_baseline, evaluate_synthetic
from modelatlas.distill.evaluate import describe, soft_cross_entropy
from modelatlas.errors import CheckpointError, ConfigError

TINY = dict(num_nets=2, epochs=3, width=8, depth=2)


def make_digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def test_synthetic_from_real_layout_and_roundtrip(tmp_path):
    tr, _ = make_digits()
    syn = SyntheticSet.from_real(tr, 2, torch.Generator().manual_seed(0), soft_labels=True, lr=0.01)
    syn.extras["poster"] = torch.ones(3)
    assert syn.images.shape == (20, 1, 8, 8) and syn.classes.tolist() == sorted(syn.classes.tolist())
    assert syn.targets().shape == (20, 10) and syn.targets()[0].argmax() == syn.classes[0]
    assert len(syn.parameters()) == 3 and all(p.requires_grad for p in syn.parameters())
    again = SyntheticSet.load(syn.save(tmp_path))
    assert torch.equal(again.images, syn.images.detach()) and torch.equal(again.label_logits, syn.label_logits.detach())
    assert float(again.lr.detach()) == pytest.approx(0.01) and again.ipc == 2 and torch.equal(again.extras["poster"], torch.ones(3))
    with pytest.raises(CheckpointError, match="synthetic.safetensors: missing"):
        SyntheticSet.load(tmp_path / "nope")


def test_from_noise_and_too_large_ipc():
    syn = SyntheticSet.from_noise((1, 8, 8), 3, 4, torch.Generator().manual_seed(0))
    assert syn.images.shape == (12, 1, 8, 8) and syn.of_class(2).shape[0] == 4
    tr, _ = make_digits()
    with pytest.raises(ConfigError, match="fewer than ipc=1000; lower ipc"):
        SyntheticSet.from_real(tr, 1000, torch.Generator())


def test_soft_cross_entropy_matches_hard():
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    assert torch.allclose(soft_cross_entropy(logits, onehot), soft_cross_entropy(logits, y))


def test_evaluate_is_deterministic_and_records_protocol():
    tr, te = make_digits()
    syn = SyntheticSet.from_real(tr, 1, torch.Generator().manual_seed(0))
    p = EvalProtocol(**TINY)
    a, b = evaluate_synthetic(syn, te, p, seed=1), evaluate_synthetic(syn, te, p, seed=1)
    assert a.accuracies == b.accuracies and len(a.accuracies) == 2
    assert a.protocol["epochs"] == 3 and a.protocol["lr"] == 0.01 and "SGD lr 0.01" in a.protocol["description"]
    base = evaluate_random_baseline(tr, te, 1, p, seed=1)
    assert 0 <= base.mean <= 100 and base.protocol["baseline"].startswith("random real subset")


def test_adam_protocol_soft_labels_and_dsa():
    tr, te = make_digits()
    syn = SyntheticSet.from_real(tr, 1, torch.Generator().manual_seed(0), soft_labels=True, lr=0.005)
    res = evaluate_synthetic(syn, te, EvalProtocol(kind="adam", dsa=True, **TINY))
    assert res.protocol["lr"] == pytest.approx(0.005) and "Adam" in describe(EvalProtocol(kind="adam").resolved())
    assert EvalProtocol(dsa=True).resolved().epochs == 1000 and EvalProtocol().resolved().epochs == 300


def test_protocol_errors():
    with pytest.raises(ConfigError, match="kind must be 'sgd' or 'adam'"):
        EvalProtocol(kind="lbfgs")
    with pytest.raises(ConfigError, match="num_nets must be >= 1"):
        EvalProtocol(num_nets=0)


def make_saved_set(folder, **edits):
    """A tiny saved set (3 classes x 2 images, soft labels, lr) with tensors replaced or class_names edited."""
    import json

    from safetensors.torch import load_file, save_file

    syn = SyntheticSet(torch.zeros(6, 1, 4, 4), torch.arange(3).repeat_interleave(2), 3, torch.zeros(6, 3), 0.1)
    syn.save(folder)
    state = load_file(str(folder / "synthetic.safetensors"))
    state.update({k: v for k, v in edits.items() if k != "class_names"})
    save_file(state, str(folder / "synthetic.safetensors"))
    if "class_names" in edits:
        info = json.loads((folder / "synthetic.json").read_text())
        (folder / "synthetic.json").write_text(json.dumps({**info, "class_names": edits["class_names"]}))
    return folder


@pytest.mark.parametrize("edits,file,message", [
    ({"classes": torch.tensor([0, 0, 1, 1, 2, 5])}, "synthetic.safetensors", r"class indices in \[0, 3\).*0\.\.5"),
    ({"classes": torch.tensor([-1, 0, 1, 1, 2, 2])}, "synthetic.safetensors", r"class indices in \[0, 3\)"),
    ({"classes": torch.zeros(5, dtype=torch.long)}, "synthetic.safetensors", "classes must be 6 integers"),
    ({"classes": torch.zeros(6, 1, dtype=torch.long)}, "synthetic.safetensors", "classes must be 6 integers"),
    ({"classes": torch.zeros(6)}, "synthetic.safetensors", "classes must be 6 integers.*float32"),
    ({"label_logits": torch.zeros(6, 4)}, "synthetic.safetensors", r"label_logits must be \(N, K\) = \(6, 3\)"),
    ({"lr": torch.ones(2)}, "synthetic.safetensors", "lr must be one number"),
    ({"images": torch.zeros(6)}, "synthetic.safetensors", "images must be"),
    ({"class_names": ["a"]}, "synthetic.json", "class_names must be 3 strings.*got 1 entries"),
    ({"class_names": ["a", "b", 3]}, "synthetic.json", "the non-string 3"),
    # non-finite values trained the evaluation nets on NaN and scored chance as the set's accuracy
    ({"images": torch.full((6, 1, 4, 4), float("nan"))}, "synthetic.safetensors", "images must be finite"),
    ({"label_logits": torch.full((6, 3), float("inf"))}, "synthetic.safetensors", "label_logits must be finite"),
    ({"lr": torch.tensor([float("nan")])}, "synthetic.safetensors", "lr must be a finite number > 0, got nan"),
    ({"lr": torch.tensor([-0.1])}, "synthetic.safetensors", "lr must be a finite number > 0, got -0.1"),
    # a HeLlO projector or PoDD label grid stored as an extra tensor labelled the evaluation's images NaN
    ({"extra.label_grid": torch.full((2, 2), float("nan"))}, "synthetic.safetensors",
     "extra.label_grid must be finite"),
])
def test_hand_edited_set_is_refused_naming_the_file(tmp_path, edits, file, message):
    """These once loaded and crashed in training with an IndexError / RuntimeError (`atlas distill eval`)."""
    make_saved_set(tmp_path, **edits)
    with pytest.raises(CheckpointError, match=message) as e:
        SyntheticSet.load(tmp_path)
    assert str(e.value).startswith(str(tmp_path / file))

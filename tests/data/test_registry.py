import pytest
import torch

from modelatlas.data import load_dataset
from modelatlas.data.registry import ArrayDataset
from modelatlas.errors import ConfigError


def test_digits_split_is_disjoint_and_seeded():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert tr.x.shape[1:] == (1, 8, 8) and len(tr) + len(te) == 1797
    assert 0.0 <= float(tr.x.min()) and float(tr.x.max()) <= 1.0
    assert len(te) == 449 and tr.num_classes == 10


def test_unknown_dataset_lists_available():
    with pytest.raises(ConfigError, match="unknown dataset 'nope'; available: .*digits"):
        load_dataset("nope")


def test_holdout_is_a_seeded_disjoint_partition():
    tr = load_dataset("digits", "train")
    rest, held = tr.holdout(0.2, seed=3)
    assert len(held) == round(0.2 * len(tr)) and len(rest) + len(held) == len(tr)
    again = tr.holdout(0.2, seed=3)[1]
    assert torch.equal(held.x, again.x) and torch.equal(held.y, again.y)
    assert not torch.equal(held.x, tr.holdout(0.2, seed=4)[1].x)
    flat = lambda d: {tuple(r.tolist()) for r in d.x.flatten(1)}  # noqa: E731
    assert len(flat(rest) | flat(held)) == len(flat(tr))  # every example lands in exactly one part


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_holdout_rejects_a_fraction_outside_0_1(fraction):
    with pytest.raises(ConfigError, match=f"dataset 'digits': holdout fraction must be in \\(0, 1\\), got {fraction}"):
        load_dataset("digits", "train").holdout(fraction, seed=0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width_become_int64(dtype):
    """int32 labels were kept, and distillation failed at its first loss: "expected target dtype to be Long"."""
    import torch.nn.functional as F

    from modelatlas.data.registry import ArrayDataset

    ds = ArrayDataset("toy", torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 1, 0], dtype=dtype), ["a", "b"])
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == [0, 1, 1, 0]
    assert F.cross_entropy(torch.zeros(4, 2), ds.subset([0, 1, 2, 3]).y).item() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_float_inputs_of_any_width_become_float32(dtype):
    """float64 inputs (torch.from_numpy of NumPy's default) failed in the first network: "Input type (double)"."""
    from modelatlas.data.registry import ArrayDataset

    ds = ArrayDataset("toy", torch.full((2, 1, 2, 2), 0.5, dtype=dtype), torch.tensor([0, 1]), ["a", "b"])
    assert ds.x.dtype == torch.float32 and float(ds.x[0, 0, 0, 0]) == 0.5


def test_integer_inputs_are_refused_with_the_fix():
    from modelatlas.data.registry import ArrayDataset

    with pytest.raises(ConfigError, match="'toy': inputs must be floating point.*got torch.uint8; divide uint8 pixels"):
        ArrayDataset("toy", torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])


@pytest.mark.parametrize("seed,alias", [(2**64 - 1, -1), (2**63, -(2**63))])
def test_a_seed_of_2_to_the_63_or_more_is_refused_not_aliased(seed, alias):
    """torch reduces seeds mod 2**64, so seed 2**64 - 1 split digits exactly as seed -1 did."""
    load_dataset("digits", "test", seed=alias)  # the in-range seed loads
    with pytest.raises(ConfigError, match=f"dataset 'digits': seed must be an integer from -2\\*\\*63 to "
                                          f"2\\*\\*63 - 1, got {seed}"):
        load_dataset("digits", "test", seed=seed)


@pytest.mark.parametrize("seed", [2**64 - 1, 2**64, 1.5, True, "3"])
def test_holdout_refuses_a_seed_that_is_not_a_seed(seed):
    """holdout(0.2, 2**64 - 1) set aside exactly what seed -1 did, 1.5 what 1 did; 2**64 raised a bare ValueError."""
    with pytest.raises(ConfigError, match=f"dataset 'digits': holdout seed must be an integer from -2\\*\\*63 to "
                                          f"2\\*\\*63 - 1, got {seed!r}"):
        load_dataset("digits", "train").holdout(0.2, seed=seed)


def test_subset_takes_a_boolean_mask_as_a_mask():
    """subset(ds.y == 3) cast the mask to 0/1 indices: N copies of examples 0 and 1 (labels 7 and 1), silently."""
    tr = load_dataset("digits", "train")
    threes = tr.subset(tr.y == 3)
    assert len(threes) == int((tr.y == 3).sum()) and set(threes.y.tolist()) == {3}
    assert torch.equal(threes.x, tr.x[tr.y == 3])
    assert len(tr.subset((tr.y == 3).numpy())) == len(threes)
    with pytest.raises(ConfigError, match=f"dataset 'digits': a boolean mask for subset needs {len(tr)} entries, "
                                          r"got shape \(3,\)"):
        tr.subset([True, False, True])


def test_subset_refuses_fractional_indices_and_takes_an_empty_list():
    """subset([1.7]) was cast to example 1 silently."""
    tr = load_dataset("digits", "train")
    assert len(tr.subset([])) == 0
    with pytest.raises(ConfigError, match=r"dataset 'digits': subset indices must be integers \(or a boolean mask\), "
                                          r"got torch.float32"):
        tr.subset([1.7])


@pytest.mark.parametrize("field", ["x", "y"])
def test_array_dataset_names_a_numpy_array_and_the_fix(field):
    """A NumPy x or y raised AttributeError: 'numpy.ndarray' object has no attribute 'dim'."""
    import numpy as np

    from modelatlas.data.registry import ArrayDataset

    arrays = {"x": torch.zeros(2, 1, 2, 2), "y": torch.zeros(2, dtype=torch.long)}
    arrays[field] = arrays[field].numpy()
    assert isinstance(arrays[field], np.ndarray)
    with pytest.raises(ConfigError, match=f"dataset 'a': {field} must be a torch tensor, got ndarray; wrap NumPy "
                                          "arrays with torch.from_numpy"):
        ArrayDataset("a", arrays["x"], arrays["y"], ["c"])


@pytest.mark.parametrize("fraction,held", [(0.01, 0), (0.99, 20)])
def test_holdout_that_would_leave_a_part_empty_is_refused(fraction, held):
    """holdout(0.01) of 20 examples returned an empty validation part (0.99: an empty rest), silently."""
    small = load_dataset("digits", "train").subset(range(20))
    with pytest.raises(ConfigError, match=f"dataset 'digits': holdout fraction {fraction} of 20 examples sets aside "
                                          f"{held}, leaving one part empty"):
        small.holdout(fraction, seed=0)


def test_holdout_takes_a_numpy_integer_seed():
    """is_seed takes Python ints only: np.int64(3), which torch_generator took before, must still work."""
    import numpy as np

    tr = load_dataset("digits", "train")
    assert torch.equal(tr.holdout(0.2, seed=np.int64(3))[1].x, tr.holdout(0.2, seed=3)[1].x)


def test_seeds_differing_above_32_bits_give_other_splits():
    """torch's CPU generator keeps 32 bits of a seed: seed 2**32 split digits exactly as seed 0 did."""
    from modelatlas.data import load_dataset

    a, b = load_dataset("digits", "test", seed=0), load_dataset("digits", "test", seed=2**32)
    assert not torch.equal(a.x, b.x)
    assert torch.equal(a.x, load_dataset("digits", "test", seed=0).x)


def test_loader_options_take_numpy_scalars():
    """seed=np.int64(3) raised "seed must be an integer, got np.int64(3)" (and test_fraction=np.float32(0.3)
    "must be a number in (0, 1)"), though holdout takes the same seed: they are read as 3 and 0.3 now."""
    import numpy as np

    a = load_dataset("digits", "test", seed=np.int64(3), test_fraction=np.float64(0.3))
    b = load_dataset("digits", "test", seed=3, test_fraction=0.3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert len(load_dataset("digits", "test", test_fraction=np.float32(0.5))) == 898
    with pytest.raises(ConfigError, match="seed must be an integer, got np.True_"):
        load_dataset("digits", seed=np.True_)


def test_a_stratified_subset_keeps_every_class_share_seeded_and_in_order():
    """`--max-train N` took the first N examples: of a dataset read class by class, its first classes only."""
    y = torch.tensor([0] * 20 + [1] * 5 + [2] * 5)  # class by class, as an image folder is read
    data = ArrayDataset("d", torch.arange(30.0).reshape(30, 1, 1, 1), y, ["a", "b", "c"])
    part = data.stratified(6, seed=3)
    assert torch.bincount(part.y).tolist() == [4, 1, 1]  # each class its share of 6
    assert part.x.flatten().tolist() == sorted(part.x.flatten().tolist())  # in the dataset's order
    assert torch.equal(data.stratified(6, seed=3).x, part.x) and not torch.equal(data.stratified(6, seed=4).x, part.x)
    assert torch.bincount(data.stratified(7, seed=0).y).tolist() == [5, 1, 1]  # 4.67, 1.17, 1.17: largest remainder
    assert data.stratified(30, seed=0) is data and data.stratified(99, seed=0) is data
    with pytest.raises(ConfigError, match="a positive number of examples, got 0"):
        data.stratified(0, seed=0)


def test_each_dataset_says_whether_it_loads_here_without_reading_data(tmp_path, monkeypatch):
    """`atlas data list` listed fashion-mnist as if present on a machine without the package; the first
    command that used it failed."""
    from modelatlas.data.registry import dataset_status, module_status

    assert dataset_status("digits") == "ready"
    assert dataset_status("cifar10") == dataset_status("image-folder") == "needs its folder: --data-root DIR (root= in Python)"
    monkeypatch.setenv("ATLAS_FASHION_MNIST", str(tmp_path))
    assert dataset_status("fashion-mnist") == (f"missing in {tmp_path}: sudo apt-get install dataset-fashion-mnist, "
                                               "or --data-root DIR (root=)")
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / (stem + ".gz")).write_bytes(b"")
    assert dataset_status("fashion-mnist") == "ready"
    assert module_status("json") == "ready"
    assert module_status("no_such_module_here") == "missing: pip install modelatlas[data]"
    assert dataset_status("no-such-dataset") == "unknown"


def test_data_list_prints_each_status(capsys):
    from modelatlas.cli.main import main

    assert main(["data", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("digits ")))
    assert lines[at + 1].split() == ["here:", "ready"]

import pytest

from modelatlas.data import load_dataset
from modelatlas.errors import ConfigError


def test_digits_split_is_disjoint_and_seeded():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert tr.x.shape[1:] == (1, 8, 8) and len(tr) + len(te) == 1797
    assert 0.0 <= float(tr.x.min()) and float(tr.x.max()) <= 1.0
    assert len(te) == 449 and tr.num_classes == 10


def test_unknown_dataset_lists_available():
    with pytest.raises(ConfigError, match="unknown dataset 'nope'; available: .*digits"):
        load_dataset("nope")

import torch

from modelatlas.weights.sampled import holds_sample, sample_values

SHAPE = (2, 3, 4)  # 6 rows of 4 values
PICK = torch.tensor([0, 3, 5])


def test_whole_layer_or_its_sampled_rows_and_nothing_else():
    whole = torch.arange(24.0).reshape(SHAPE)
    assert holds_sample(whole, SHAPE, PICK, None)
    assert holds_sample(torch.zeros(3, 4), SHAPE, PICK, PICK.int())  # those rows, said to be those
    assert not holds_sample(torch.zeros(3, 4), SHAPE, PICK, None)  # another model's small layer: not a sample
    assert not holds_sample(torch.zeros(3, 4), SHAPE, torch.tensor([0, 2, 5]), PICK)  # other rows
    assert not holds_sample(torch.zeros(2, 4), SHAPE, PICK, PICK)  # rows said, shape not theirs
    assert not holds_sample(torch.zeros(6, 4), SHAPE, PICK, None)  # the whole layer in another shape


def test_sample_values_are_rows_of_the_last_dimension():
    whole = torch.arange(24.0).reshape(SHAPE)
    assert sample_values(whole, SHAPE, PICK).tolist() == [[0, 1, 2, 3], [12, 13, 14, 15], [20, 21, 22, 23]]
    rows = torch.ones(3, 4)
    assert torch.equal(sample_values(rows, SHAPE, PICK), rows)  # those rows already

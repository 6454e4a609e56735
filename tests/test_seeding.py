from modelatlas.seeding import derive_seed, torch_generator


def test_derive_seed_is_stable_and_distinguishes_keys():
    assert derive_seed(0, "root") == derive_seed(0, "root")
    seeds = {derive_seed(0, "root"), derive_seed(0, "root", 0), derive_seed(0, "root", 0, 0),
             derive_seed(1, "root"), derive_seed(0, "root", 1), derive_seed(0, "roo"), derive_seed(0)}
    assert len(seeds) == 7  # trailing zero keys and key counts must not collide
    assert all(0 <= s < 2**31 - 1 for s in seeds)


def test_torch_generator_repeats():
    import torch

    assert torch.equal(torch.rand(3, generator=torch_generator(5)), torch.rand(3, generator=torch_generator(5)))


def test_seeds_2_to_the_32_apart_give_different_torch_streams():
    """torch's CPU generator keeps the low 32 bits of its seed: `--seed 4294967296` repeated the run of
    `--seed 0` (and -1 that of 4294967295) wherever a seed reached torch_generator as it was."""
    import torch

    def draw(seed):
        return torch.rand(4, generator=torch_generator(seed))

    assert not torch.equal(draw(0), draw(2**32)) and not torch.equal(draw(2**32 - 1), draw(-1))
    assert not torch.equal(draw(7), draw(2**40 + 7))
    assert torch.equal(draw(12345), torch.rand(4, generator=torch.Generator().manual_seed(12345)))  # unchanged

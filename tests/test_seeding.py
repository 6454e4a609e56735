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

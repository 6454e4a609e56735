"""Fitted transforms on degenerate inputs: constant channels, NaN, bad settings, corrupt saved state."""

import pytest
import torch

from modelatlas.data.transforms import ZCA, Standardize, from_state_dict, make_transform
from modelatlas.errors import ConfigError


def test_standardize_leaves_a_constant_channel_unscaled():
    """A channel constant in the fitted data had std clamped to 1e-8, so a test value 0.1 away became 1e7."""
    x = torch.rand(20, 2, 3, 3)
    x[:, 0] = 0.5
    t = Standardize().fit(x)
    test = x[:2].clone()
    test[:, 0] = 0.6
    out = t.transform(test)
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 0.1), atol=1e-6)
    assert torch.allclose(t.inverse(out), test, atol=1e-6)
    assert torch.allclose(Standardize.from_state_dict(t.state_dict()).transform(test), out)


def test_standardize_of_one_value_per_channel_is_finite():
    """One 1x1 example: std of one value was NaN (no degrees of freedom), and every output NaN."""
    t = Standardize().fit(torch.rand(1, 3, 1, 1))
    assert torch.isfinite(t.transform(torch.rand(2, 3, 1, 1))).all()


@pytest.mark.parametrize("kind", ["standardize", "zca"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fit_refuses_non_finite_inputs_naming_the_example(kind, bad):
    """One NaN pixel made every transformed value NaN, silently (distillation then 'diverged')."""
    x = torch.rand(6, 1, 2, 2)
    x[4, 0, 1, 0] = bad
    with pytest.raises(ConfigError, match=f"{kind} transform: cannot fit on non-finite inputs \\(first {bad} "
                                          r"in example 4\)"):
        make_transform(kind).fit(x)


@pytest.mark.parametrize("reg", [float("nan"), float("inf"), "0.1", True])
def test_zca_refuses_a_regularization_that_is_not_a_finite_positive_number(reg):
    """nan passed `reg <= 0` and whitened everything to NaN, inf to 0; "0.1" raised a bare TypeError."""
    with pytest.raises(ConfigError, match=f"ZCA regularization must be > 0 and finite, got {reg!r}"):
        ZCA(regularization=reg)


@pytest.mark.parametrize("kind,key,value", [("standardize", "std", float("nan")), ("standardize", "std", 0.0),
                                            ("standardize", "mean", float("inf")), ("zca", "whiten", float("nan"))])
def test_a_saved_transform_with_unusable_values_is_refused_naming_the_tensor(kind, key, value):
    """A transform.safetensors with NaN (fitted on NaN data) or std 0 turned every evaluation input into NaN / inf."""
    state = make_transform(kind).fit(torch.rand(8, 2, 2, 2)).state_dict()
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    with pytest.raises(ConfigError, match=f"the saved {kind!r} transform has {'a non-positive' if value == 0 else 'a non-finite'} "
                                          f"value in {key!r}"):
        from_state_dict(kind, state)


@pytest.mark.parametrize("kind", ["standardize", "zca"])
def test_fit_of_inputs_the_caller_checked_makes_no_second_scan(kind, monkeypatch):
    from modelatlas.data import transforms

    def scan(kind, x):
        raise AssertionError("scanned again")

    x = torch.rand(6, 1, 2, 2)
    monkeypatch.setattr(transforms, "_check_finite", scan)
    fitted = make_transform(kind).fit(x, finite=True)
    assert torch.allclose(fitted.inverse(fitted.transform(x)), x, atol=1e-5)
    with pytest.raises(AssertionError, match="scanned again"):
        make_transform(kind).fit(x)

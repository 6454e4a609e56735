from dataclasses import dataclass

from modelatlas.config_types import Misfit, fits, misfit


@dataclass
class Example:
    count: int = 1
    rate: float | None = None
    on: bool = False
    name: str = "x"


def test_fits_takes_an_int_as_a_float_but_no_bool_as_a_number():
    assert fits(2, float) and fits(2.5, float) and fits(3, int) and fits(None, type(None))
    assert not fits(True, int) and not fits(True, float) and not fits(2.5, int) and not fits("1", float)


def test_misfit_names_the_first_wrong_field_and_its_types():
    assert misfit({"count": 2, "rate": 1, "on": True, "name": "y"}, Example) is None
    assert misfit({"rate": None}, Example) is None
    bad = misfit({"count": 2, "rate": "fast", "on": 1}, Example)  # rate comes first of the two wrong ones
    assert bad == Misfit("rate", "fast", (float, type(None))) and bad.names == "float or None"
    assert misfit({"on": "yes"}, Example).names == "bool"

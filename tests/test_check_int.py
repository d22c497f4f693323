"""`ms_mm.models.check_int`: the integer-field check the family configs share."""
from types import SimpleNamespace

import pytest

from ms_mm.models import check_int


def test_accepts_ints_at_or_above_the_minimum():
    ns = SimpleNamespace(a=3, z=0)
    assert check_int(ns, "a", "Cfg") == 3
    assert check_int(ns, "z", "Cfg", minimum=0) == 0


@pytest.mark.parametrize("value, minimum, message", [
    (0, 1, r"Cfg\.f: must be a positive int, got 0"),
    (True, 1, r"Cfg\.f: must be a positive int, got True"),       # a bool is not an int here
    (2.0, 1, r"Cfg\.f: must be a positive int, got 2\.0"),
    (-1, 0, r"Cfg\.f: must be a non-negative int, got -1"),
    (3, 4, r"Cfg\.f: must be an int >= 4, got 3"),
])
def test_refuses_and_names_the_field(value, minimum, message):
    with pytest.raises(ValueError, match=message):
        check_int(SimpleNamespace(f=value), "f", "Cfg", minimum=minimum)


def test_family_configs_use_it():
    from ms_mm.models.deepseek_vl2.config import VisionConfig
    from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config

    with pytest.raises(ValueError, match=r"vision_config\.heads: must be a positive int, got 0"):
        VisionConfig(heads=0).validate()
    with pytest.raises(ValueError, match=r"LuminaMGPT2Config\.num_hidden_layers: must be a positive int, got False"):
        LuminaMGPT2Config(num_hidden_layers=False).validate()

"""One reader per config form: the trainer, the launcher and the dry run read a model json the same way
(each family's `config_from_json`, found through the registry)."""
import json
from pathlib import Path

import pytest

from ms_mm import registry
from ms_mm.parallel.dryrun import load_model_config
from ms_mm.training.trainer import family_and_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_JSONS = sorted(REPO.glob("examples/mindspore/*/model*.json"))


@pytest.mark.parametrize("path", EXAMPLE_JSONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_trainer_and_dry_run_read_example_model_jsons_alike(path):
    data = json.loads(path.read_text())
    family, from_trainer = family_and_config(data, str(path))
    from_dry_run = load_model_config(str(path))
    assert from_trainer == from_dry_run
    assert registry.family_of_config(from_dry_run) is family


@pytest.mark.parametrize("model_json", [
    {"model_id": "deepseekvl2", "preset": "tiny-deepseek", "language_config": {"num_hidden_layers": 2}},
    {"model_id": "qwen2_5vl", "preset": "tiny", "text": {"num_key_value_heads": 4}},
])
def test_preset_overrides_mean_the_same_everywhere(model_json):
    _, from_trainer = family_and_config(model_json, "model.json")
    assert from_trainer == load_model_config(model_json)
    first = next(iter(model_json[k] for k in ("language_config", "text") if k in model_json))
    key, value = next(iter(first.items()))
    section = from_trainer.language_config if "language_config" in model_json else from_trainer.text
    assert getattr(section, key) == value


def test_unknown_preset_names_every_family():
    with pytest.raises(ValueError) as e:
        load_model_config("13b")
    for family in registry.families():
        if family.presets:
            assert f"unknown {family.title} preset '13b'" in str(e.value)

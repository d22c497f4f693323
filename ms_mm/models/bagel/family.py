"""Registry record of BAGEL-MoT: its converter, configs, model and mm-parity runner.

(Training, data and inference records come with the finetuning path; until then the trainer refuses
`model_id: bagel` with the message that it has no data loader.)"""
from __future__ import annotations

from ms_mm.models.bagel.config import BagelConfig, config_from_hf
from ms_mm.models.bagel.inputs import MODEL_INPUT_NAMES
from ms_mm.registry import Family, lazy


def config_from_json(d):
    """HF-style release configs (`llm_config` / `vit_config` / `ae_config` dicts), `{"preset": name}`
    or our `to_dict()` form."""
    if "llm_config" in d:
        return config_from_hf(d)
    if "preset" in d:
        return BagelConfig.preset(d["preset"])
    return BagelConfig.from_dict({k: v for k, v in d.items() if k != "model_id"})


FAMILY = Family(
    name="bagel", title="BAGEL", model_ids=("bagel",),
    converter="BagelConverter", adapter="adapters.bagel",
    config_class=BagelConfig, config_from_json=config_from_json,
    claims_json=lambda d: "llm_config" in d and "vit_config" in d,
    presets={"bagel-tiny": lambda: BagelConfig.preset("tiny"), "bagel-7b-mot": lambda: BagelConfig.preset("7B-MoT")},
    build_model=lazy("ms_mm.models.bagel.modeling:Bagel"), input_names=MODEL_INPUT_NAMES,
    parity={"bagel": lazy("ms_mm.models.bagel.parity:run_parity")},
)

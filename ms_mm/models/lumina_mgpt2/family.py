"""Registry records of Lumina-mGPT 2.0 and of its image tokenizer MoVQGAN (two converters, two
mm-parity runners, one folder)."""
from __future__ import annotations

from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config, config_from_hf
from ms_mm.models.lumina_mgpt2.inputs import MODEL_INPUT_NAMES
from ms_mm.models.lumina_mgpt2.movqgan_config import MoVQGANConfig
from ms_mm.registry import Family, lazy


def config_from_json(d):
    if "preset" in d:
        return LuminaMGPT2Config.preset(d["preset"])
    if "model_type" in d:
        return config_from_hf(d)
    return LuminaMGPT2Config.from_dict({k: v for k, v in d.items() if k != "model_id"})


FAMILIES = [
    Family(
        name="lumina_mgpt2", title="Lumina-mGPT 2.0", model_ids=("lumina_mgpt2", "lumina"),
        converter="LuminaConverter", adapter="adapters.lumina_mgpt2",
        config_class=LuminaMGPT2Config, config_from_json=config_from_json,
        claims_json=lambda d: d.get("model_type") == "chameleon",
        presets={"lumina-tiny": lambda: LuminaMGPT2Config.preset("tiny"),
                 "lumina-mgpt2-7b": lambda: LuminaMGPT2Config.preset("7B")},
        build_model=lazy("ms_mm.models.lumina_mgpt2.modeling:LuminaMGPT2ForCausalLM"), input_names=MODEL_INPUT_NAMES,
        parity={"lumina_mgpt2": lazy("ms_mm.models.lumina_mgpt2.parity:run_parity")},
    ),
    Family(
        name="movqgan", title="MoVQGAN", converter="MoVQGANConverter", adapter="adapters.movqgan",
        config_class=MoVQGANConfig,
        parity={"movqgan": lazy("ms_mm.models.lumina_mgpt2.parity:run_movqgan_parity")},
    ),
]

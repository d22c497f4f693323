"""BAGEL-MoT for ms-mm: config, host-side input preparation and the MindSpore model (Cells import
MindSpore lazily, so the converter can read configs without it)."""
from ms_mm.models.bagel.config import (AutoEncoderConfig, BagelConfig, Qwen2MoTConfig, SiglipNaViTConfig,
                                       config_from_hf)
from ms_mm.models.bagel.inputs import MODEL_INPUT_NAMES, build_model_inputs

__all__ = ["BagelConfig", "Qwen2MoTConfig", "SiglipNaViTConfig", "AutoEncoderConfig", "config_from_hf",
           "MODEL_INPUT_NAMES", "build_model_inputs", "Bagel", "AutoEncoder", "LatentDecoder"]


def __getattr__(name):
    if name in ("Bagel", "AutoEncoder", "LatentDecoder"):
        from ms_mm.models.bagel import modeling
        return getattr(modeling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

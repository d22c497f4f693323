"""DeepSeek-VL2 (Tiny / Small / Base): config, host-side input preparation and the MindSpore model."""
from .config import DeepseekVL2Config, LanguageConfig, ProjectorConfig, VisionConfig, config_from_mindspeed
from .inputs import (MODEL_INPUT_NAMES, build_model_inputs, image_token_rows, num_image_tokens,
                     select_best_resolution, tile_grid)

__all__ = ["DeepseekVL2Config", "config_from_mindspeed", "VisionConfig", "ProjectorConfig", "LanguageConfig",
           "MODEL_INPUT_NAMES", "DeepseekVL2ForCausalLM", "causal_lm_loss", "build_model_inputs",
           "select_best_resolution", "tile_grid", "num_image_tokens", "image_token_rows"]


def __getattr__(name):
    # The Cells need MindSpore; configs and host-side inputs don't (the converter and the data
    # pipeline use only those).
    if name in ("DeepseekVL2ForCausalLM", "causal_lm_loss"):
        from . import modeling
        return getattr(modeling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

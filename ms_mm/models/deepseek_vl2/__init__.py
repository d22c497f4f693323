"""DeepSeek-VL2 (Tiny / Small / Base): config, host-side input preparation and the MindSpore model."""
from .config import DeepseekVL2Config, LanguageConfig, ProjectorConfig, VisionConfig, config_from_mindspeed
from .inputs import (build_model_inputs, image_token_rows, num_image_tokens, select_best_resolution,
                     tile_grid, tile_image)
from .modeling import MODEL_INPUT_NAMES, DeepseekVL2ForCausalLM, causal_lm_loss

__all__ = ["DeepseekVL2Config", "config_from_mindspeed", "VisionConfig", "ProjectorConfig", "LanguageConfig", "MODEL_INPUT_NAMES",
           "DeepseekVL2ForCausalLM", "causal_lm_loss", "build_model_inputs", "select_best_resolution",
           "tile_grid", "num_image_tokens", "image_token_rows", "tile_image"]

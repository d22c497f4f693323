"""Lumina-mGPT 2.0: the Chameleon-style decoder (`LuminaMGPT2ForCausalLM`) and its image tokenizer
MoVQGAN (`MoVQGAN`), their configs, host-side inputs and the image-token layout. Converter specs:
adapters/lumina_mgpt2.py (`LuminaConverter`) and adapters/movqgan.py (`MoVQGANConverter`); parity
runners: `ms_mm.models.lumina_mgpt2.parity`. MindSpore Cells are imported lazily (configs and inputs
load without MindSpore)."""
from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config, LuminaTokenConfig, QK_NORM_EPS, config_from_hf
from ms_mm.models.lumina_mgpt2.inputs import (
    MODEL_INPUT_NAMES, build_model_inputs, conversation_sequence, image_token_ids, pad_batch, parse_image_tokens,
    t2i_sequence,
)
from ms_mm.models.lumina_mgpt2.movqgan_config import MoVQGANConfig, movqgan_parameter_shapes

__all__ = ["LuminaMGPT2Config", "LuminaTokenConfig", "QK_NORM_EPS", "config_from_hf", "MODEL_INPUT_NAMES",
           "build_model_inputs", "conversation_sequence", "image_token_ids", "pad_batch", "parse_image_tokens",
           "t2i_sequence", "MoVQGANConfig", "movqgan_parameter_shapes", "LuminaMGPT2ForCausalLM", "MoVQGAN"]


def __getattr__(name):
    if name == "LuminaMGPT2ForCausalLM":
        from ms_mm.models.lumina_mgpt2.modeling import LuminaMGPT2ForCausalLM
        return LuminaMGPT2ForCausalLM
    if name == "MoVQGAN":
        from ms_mm.models.lumina_mgpt2.movqgan import MoVQGAN
        return MoVQGAN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Qwen2.5-VL for ms-mm: config, host-side input preparation and the MindSpore model."""
from ms_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from ms_mm.models.qwen2_5_vl.inputs import (MODEL_INPUT_NAMES, VISION_INPUT_NAMES, build_model_inputs,
                                            get_rope_index, vision_layout)

__all__ = [
    "Qwen2_5_VLConfig", "Qwen2_5_VLVisionConfig", "Qwen2_5_VLTextConfig",
    "MODEL_INPUT_NAMES", "VISION_INPUT_NAMES", "build_model_inputs", "get_rope_index", "vision_layout",
    "Qwen2_5_VLForConditionalGeneration",
]


def __getattr__(name):
    # The Cells need MindSpore; configs and host-side inputs don't (the converter uses only those).
    if name == "Qwen2_5_VLForConditionalGeneration":
        from ms_mm.models.qwen2_5_vl.modeling import Qwen2_5_VLForConditionalGeneration
        return Qwen2_5_VLForConditionalGeneration
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

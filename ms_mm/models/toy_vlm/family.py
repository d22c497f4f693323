"""Registry record of the toy family (`model_id: "toy_vlm"`)."""
import numpy as np

from ms_mm.models.toy_vlm.modeling import INPUT_NAMES, ToyConfig, build_toy_loader, build_toy_model
from ms_mm.registry import Family

FAMILY = Family(
    name="toy_vlm", title="toy VLM", model_ids=("toy_vlm",),
    config_class=ToyConfig,
    config_from_json=ToyConfig.from_model_json,
    build_model=build_toy_model,
    input_names=INPUT_NAMES,
    build_dataloader=build_toy_loader,
    freeze_groups={
        "image_encoder.vision_encoder": ("image_encoder.encoder.",),
        "image_encoder.vision_projector": ("image_encoder.projector.",),
        "text_decoder": ("text_decoder.",),
    },
    count_tokens=lambda batch: int(np.asarray(batch["input_ids"]).size),
)

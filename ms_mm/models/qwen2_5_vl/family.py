"""Registry record of Qwen2.5-VL: what the engines (trainer, launcher, dry run, mm-convert,
mm-parity, convert.tiny) know of this family, all of it reached through `ms_mm.registry`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np

from ms_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig, claims_json, config_from_hf, config_from_json, \
    mindspeed_model_json
from ms_mm.models.qwen2_5_vl.inputs import MODEL_INPUT_NAMES, SAMPLE_AXES
from ms_mm.registry import EmbeddedDefault, Family, lazy, lazy_object

# the callables below are imported when first called (`lazy`): this module stays light
DEMO_WRITER = "ms_mm.data.demo:make_demo_dataset"
FREEZE_DEFAULTS = {"image_encoder.vision_encoder": True, "image_encoder.vision_projector": True,
                   "text_decoder": False}


def _build_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers, skip_bad_samples,
                      **kwargs):
    from ms_mm.models.qwen2_5_vl.processing import build_dataloader

    return build_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size,
                            num_workers if num_workers else None, skip_bad_samples, **kwargs)


def _dp_slice(inputs, dp_rank, dp, config):
    from ms_mm.models.qwen2_5_vl.inputs import as_dp_slice

    return as_dp_slice(inputs, dp_rank, dp)


def _llm_tokens(batch) -> int:
    return int(np.asarray(batch["attention_mask"]).sum())


def embedded_model_json(hf_dir, user_model_json: dict) -> Dict[str, Any]:
    """model.json of the embedded default's tiny Qwen2.5-VL (HF config in `hf_dir`), with the user's
    freeze switches: the embedded default trains what the real run would."""
    from ms_mm.training.trainer import freeze_switches

    config = config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
    freeze = freeze_switches(user_model_json, FREEZE_DEFAULTS)
    return mindspeed_model_json(config, freeze={path.rsplit(".", 1)[-1]: value for path, value in freeze.items()})


FAMILY = Family(
    name="qwen2_5_vl", title="Qwen2.5-VL", model_ids=("qwen2_5vl", "qwen2_5_vl"),
    dataset_types=("huggingface", ""),
    converter="Qwen2_5_VLConverter", adapter="adapters.qwen2_5_vl",
    config_class=Qwen2_5_VLConfig, config_from_json=config_from_json, claims_json=claims_json,
    presets={name: (lambda name=name: Qwen2_5_VLConfig.preset(name)) for name in ("tiny", "3b", "7b", "32b", "72b")},
    build_model=lazy("ms_mm.models.qwen2_5_vl.modeling:Qwen2_5_VLForConditionalGeneration"),
    input_names=MODEL_INPUT_NAMES,
    sample_axes=SAMPLE_AXES, dp_slice=_dp_slice,
    build_dataloader=_build_dataloader,
    freeze_groups={
        "image_encoder.vision_encoder": ("image_encoder.encoder.",),
        "image_encoder.vision_projector": ("image_encoder.projector.",),
        "text_decoder": ("text_decoder.",),
    },
    count_tokens=_llm_tokens,
    parallel_plan=lazy_object("ms_mm.models.qwen2_5_vl.parallelize:PLAN"),
    synthetic_batch=lazy("ms_mm.models.qwen2_5_vl.parallelize:synthetic_batch"),
    parity={"qwen2_5_vl": lazy("ms_mm.models.qwen2_5_vl.parity:run_parity")},
    build_tiny=lazy("ms_mm.models.qwen2_5_vl.tiny:build_tiny"),
    embedded_default=EmbeddedDefault(
        name="Qwen2.5-VL-tiny", write_demo=lazy(DEMO_WRITER), demo_dir="data/demo",
        demo_data_file="mllm_format_demo_data.json",
        demo_data_json=lazy("ms_mm.models.qwen2_5_vl.demo:demo_data_config"), model_json=embedded_model_json,
        hf_dir_key="dataset_param.preprocess_parameters.model_name_or_path", hub="Qwen/{name}"),
)

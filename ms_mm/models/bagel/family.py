"""Registry record of BAGEL-MoT: converter, configs, model, mm-parity runner, and the finetuning path
(packed data loader, the train Cell with the frozen VAE inside, CE / MSE / packing-efficiency
metrics and the upstream log line, the weights' EMA, the recipe's own flags, the embedded default)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ms_mm.models.bagel.config import (BagelConfig, claims_mindspeed, config_from_hf, config_from_mindspeed,
                                       mindspeed_model_json)
from ms_mm.models.bagel.processing import TRAIN_INPUT_NAMES
from ms_mm.registry import EmbeddedDefault, Family, lazy


def config_from_json(d):
    """MindSpeed-MM model.json (`mllm` / `image_encoder` / `ae`), HF-style release configs (`llm_config` /
    `vit_config` / `ae_config` dicts), `{"preset": name}` or our `to_dict()` form."""
    if claims_mindspeed(d):
        return config_from_mindspeed(d)
    if "llm_config" in d:
        return config_from_hf(d)
    if "preset" in d:
        return BagelConfig.preset(d["preset"])
    return BagelConfig.from_dict({k: v for k, v in d.items() if k != "model_id"})


def _build_model(config, compute_dtype):
    from ms_mm.models.bagel.modeling import BagelForTraining

    return BagelForTraining(config, compute_dtype)


def _build_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers, skip_bad_samples,
                      **kwargs):
    from ms_mm.models.bagel.processing import build_bagel_dataloader

    return build_bagel_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers,
                                  skip_bad_samples, **kwargs)


def _tokens(batch) -> int:
    return int(batch["num_real_tokens"])


def step_metrics(config, outputs, batch) -> Dict[str, Any]:
    ce, mse = (float(o) for o in outputs)
    return {"ce loss": ce, "mse loss": mse,
            "packing efficiency": float(batch["num_real_tokens"]) / float(batch["token_budget"])}


def log_line(iteration, metrics, steps_per_sec) -> str:
    """Upstream train/pretrain_unified_navit.py's line."""
    return (f"(step={iteration:07d}) Train Loss mse: {metrics.get('mse loss', float('nan')):.4f}, "
            f"Train Loss ce: {metrics.get('ce loss', float('nan')):.4f}, Train Steps/Sec: {steps_per_sec:.2f}, "
            f"Packing Efficiency: {metrics.get('packing efficiency', float('nan')):.3f}")


def _bool(v):
    from ms_mm.training.arguments import str2bool

    return str2bool(v)


EXTRA_FLAGS = {
    "--visual_gen": (_bool, "train the generation tasks (t2i_pretrain, unified_edit); False: understanding only"),
    "--visual_und": (_bool, "train the understanding task (vlm_sft); False: generation only"),
    "--max_latent_size": (int, "latent position table side (model) and the data's largest latent side"),
    "--expected_num_tokens": (int, "= packed_parameters.expected_num_tokens"),
    "--max_num_tokens": (int, "= packed_parameters.max_num_tokens (the packed sequence budget)"),
    "--max_num_tokens_per_sample": (int, "= packed_parameters.max_num_tokens_per_sample"),
    "--timestep_shift": (float, "flow-matching timestep shift"),
    "--freeze_und": (_bool, "upstream's freeze_und: no gradient through the understanding tokens (their und "
                            "weights, the ViT, connector and text embedding stay as loaded; lm_head still learns)"),
    "--ce_weight": (float, "weight of the CE loss"),
    "--mse_weight": (float, "weight of the MSE loss"),
}


def apply_flags(config, options):
    for key in ("max_latent_size", "timestep_shift", "ce_weight", "mse_weight"):
        if options.get(key) is not None:
            setattr(config, key, type(getattr(config, key))(options[key]))
    if options.get("freeze_und") is not None:
        config.llm.freeze_und = bool(options["freeze_und"])
    return config.validate()


FREEZE_DEFAULTS = {"image_encoder.vision_encoder": False, "image_encoder.vision_projector": False}


def embedded_model_json(hf_dir, user_model_json: dict) -> Dict[str, Any]:
    """model.json of the embedded default's tiny BAGEL (release configs in `hf_dir`), with the user's
    freeze switches."""
    from adapters.bagel import read_hf_config
    from ms_mm.training.trainer import freeze_switches

    config = config_from_hf(read_hf_config(Path(hf_dir)))
    freeze = freeze_switches(user_model_json, FREEZE_DEFAULTS)
    return mindspeed_model_json(config, freeze={p.rsplit(".", 1)[-1]: v for p, v in freeze.items()},
                                from_pretrained=str(Path(hf_dir) / "ae.safetensors"))


def _demo_data_json(demo_dir, hf_dir):
    from ms_mm.models.bagel.demo import demo_data_config

    return demo_data_config(demo_dir, hf_dir)


FAMILY = Family(
    name="bagel", title="BAGEL", model_ids=("bagel",), dataset_types=("bagel",),
    converter="BagelConverter", adapter="adapters.bagel",
    config_class=BagelConfig, config_from_json=config_from_json,
    claims_json=lambda d: ("llm_config" in d and "vit_config" in d) or claims_mindspeed(d),
    presets={"bagel-tiny": lambda: BagelConfig.preset("tiny"), "bagel-7b-mot": lambda: BagelConfig.preset("7B-MoT")},
    build_model=_build_model, input_names=TRAIN_INPUT_NAMES,
    build_dataloader=_build_dataloader,
    freeze_groups={
        "image_encoder.vision_encoder": ("image_encoder.encoder.",),
        "image_encoder.vision_projector": ("image_encoder.projector.",),
        "ae": ("vae.",),
    },
    count_tokens=_tokens,
    metric_outputs=(1, 2), step_metrics=step_metrics,      # construct: (loss, ce, mse)
    parity={"bagel": lazy("ms_mm.models.bagel.parity:run_parity")},
    build_tiny=lazy("ms_mm.models.bagel.tiny:build_tiny"),
    extra_flags=EXTRA_FLAGS, apply_flags=apply_flags, ema_decay=0.9999, log_line=log_line,
    embedded_default=EmbeddedDefault(
        name="BAGEL-tiny", write_demo=lazy("ms_mm.models.bagel.demo:make_demo_dataset"), demo_dir="data/demo_bagel",
        demo_data_file="vlm/llava_ov_si.jsonl", demo_data_json=_demo_data_json, model_json=embedded_model_json,
        hf_dir_key="dataset_param.basic_parameters.model_path", hub="ByteDance-Seed/BAGEL-7B-MoT",
        train_overrides={"--micro-batch-size": 1, "--global-batch-size": 1, "--lr": 2e-3, "--min-lr": 1e-4,
                         "--num-workers": 1, "--ema": 0.99, "--clip-grad": 1.0}),
)

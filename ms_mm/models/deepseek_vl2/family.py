"""Registry record of DeepSeek-VL2: what the engines (trainer, launcher, dry run, mm-convert,
mm-parity, convert.tiny) know of this family, all of it reached through `ms_mm.registry`.

Beyond the model: the log line's CE loss, MoE aux loss and per-layer expert load (`step_metrics`),
and the check that --expert-model-parallel-size divides the routed experts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np

from ms_mm.models.deepseek_vl2.config import (PRESET_NAMES, DeepseekVL2Config, claims_json, config_from_hf,
                                              config_from_json, mindspeed_model_json)
from ms_mm.models.deepseek_vl2.inputs import MODEL_INPUT_NAMES
from ms_mm.registry import EmbeddedDefault, Family, lazy, lazy_object

# the callables below are imported when first called (`lazy`): this module stays light
DEMO_WRITER = "ms_mm.models.deepseek_vl2.demo:make_demo_dataset"
FREEZE_DEFAULTS = {"image_encoder.vision_encoder": False, "image_encoder.vision_projector": False,
                   "text_decoder": False}


def _build_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers, skip_bad_samples,
                      **kwargs):
    from ms_mm.models.deepseek_vl2.processing import build_deepseek_vl2_dataloader

    kwargs.pop("options", None)   # the family flags act on the model only (apply_flags)
    return build_deepseek_vl2_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size,
                                         num_workers if num_workers else None, skip_bad_samples, **kwargs)


def _deepseek_real_tokens(batch) -> np.ndarray:
    """[B*S] bool: the non-padding positions (a padding key may not attend to itself, so its
    diagonal entry of `attention_bias` [B, 1, S, S] is masked)."""
    bias = np.asarray(batch["attention_bias"])
    return (np.diagonal(bias[:, 0], axis1=1, axis2=2) == 0).reshape(-1)


def _deepseek_llm_tokens(batch) -> int:
    return int(_deepseek_real_tokens(batch).sum())


def step_metrics(config, outputs, batch) -> Dict[str, Any]:
    """CE loss, MoE aux loss and per-MoE-layer expert load from construct's (ce_loss, aux_losses, routing).

    Expert load counts the (token, choice) pairs routed to each expert over the micro-batch's real
    tokens (padding left out). `expert load max/mean` is per MoE layer (1.0 = perfectly
    even, n_routed_experts / top_k = everything on k experts); `expert load cv` is the coefficient
    of variation of tokens per expert, averaged over the MoE layers.
    """
    ce_loss, aux_losses, routing = (np.asarray(o) for o in outputs)
    n_experts = config.language_config.n_routed_experts
    metrics: Dict[str, Any] = {"ce loss": float(ce_loss), "moe aux loss": float(np.sum(aux_losses))}
    if routing.shape[0] == 0:
        return metrics
    real = _deepseek_real_tokens(batch)
    max_over_mean, cv = [], []
    for layer in routing:                                           # [B*S, k] expert ids
        counts = np.bincount(layer[real].reshape(-1), minlength=n_experts).astype(np.float64)
        mean = counts.mean()
        max_over_mean.append(float(counts.max() / mean) if mean else 0.0)
        cv.append(float(counts.std() / mean) if mean else 0.0)
    metrics["expert load max/mean"] = max_over_mean
    metrics["expert load cv"] = float(np.mean(cv))
    return metrics


# Megatron's MoE capacity flags, as MindSpeed-MM's DeepSeek-VL2 scripts may pass them (model.json's
# text_decoder takes the same keys)
EXTRA_FLAGS = {
    "--moe-expert-capacity-factor": (float, "cap each expert at ceil(tokens * k / E * factor) tokens of a micro "
                                            "batch, dropping the rest (default: no capacity, nothing dropped)"),
    "--moe-token-drop-policy": (str, "which tokens an over-full expert keeps: probs (highest routing weight, "
                                     "the default) or position (the first ones)"),
}


def apply_flags(config, options):
    language = config.language_config
    if options.get("moe_expert_capacity_factor") is not None:
        language.moe_expert_capacity_factor = options["moe_expert_capacity_factor"]
    if options.get("moe_token_drop_policy") is not None:
        language.moe_token_drop_policy = options["moe_token_drop_policy"]
    config.validate()
    return config


def check_parallel_sizes(config, args) -> None:
    ep = args.expert_model_parallel_size
    experts = config.language_config.n_routed_experts
    if ep > 1 and not experts:
        raise ValueError(f"--expert-model-parallel-size {ep}: this model has no routed experts "
                         f"(text_decoder.num_moe_experts is not set)")
    if ep > 1 and experts % ep:
        raise ValueError(f"--expert-model-parallel-size {ep} does not divide the {experts} routed experts "
                         f"(text_decoder.num_moe_experts {experts}): each expert-parallel rank must hold "
                         f"{experts}/{ep} experts")


def embedded_model_json(hf_dir, user_model_json: dict) -> Dict[str, Any]:
    """model.json of the embedded default's tiny DeepSeek-VL2 (HF config in `hf_dir`), with the
    user's freeze switches."""
    from ms_mm.training.trainer import freeze_switches

    config = config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
    freeze = freeze_switches(user_model_json, FREEZE_DEFAULTS)
    return mindspeed_model_json(config, freeze={path.rsplit(".", 1)[-1]: value for path, value in freeze.items()})


FAMILY = Family(
    name="deepseek_vl2", title="DeepSeek-VL2", model_ids=("deepseekvl2", "deepseek_vl2", "DeepSeek-VL2"),
    dataset_types=("deepseekvl2",),
    converter="DeepSeekVLConverter", adapter="adapters.deepseek_vl2",
    config_class=DeepseekVL2Config, config_from_json=config_from_json, claims_json=claims_json,
    presets={name: (lambda p=preset: DeepseekVL2Config.preset(p)) for name, preset in PRESET_NAMES.items()},
    build_model=lazy("ms_mm.models.deepseek_vl2.modeling:DeepseekVL2ForCausalLM"), input_names=MODEL_INPUT_NAMES,
    build_dataloader=_build_dataloader,
    dp_slice=lazy("ms_mm.models.deepseek_vl2.inputs:as_dp_slice"),
    freeze_groups={
        "image_encoder.vision_encoder": ("image_encoder.encoder.",),
        "image_encoder.vision_projector": ("image_encoder.projector.", "image_newline", "view_seperator"),
        "text_decoder": ("text_decoder.",),
    },
    count_tokens=_deepseek_llm_tokens,
    # construct: (loss, logits, ce_loss, aux_losses, routing, routing_weights)
    metric_outputs=(2, 3, 4), step_metrics=step_metrics,
    check_parallel_sizes=check_parallel_sizes, extra_flags=EXTRA_FLAGS, apply_flags=apply_flags,
    parallel_plan=lazy_object("ms_mm.models.deepseek_vl2.parallelize:PLAN"),
    synthetic_batch=lazy("ms_mm.models.deepseek_vl2.parallelize:synthetic_batch"),
    parity={"deepseek_vl2": lazy("ms_mm.models.deepseek_vl2.parity:run_parity")},
    build_tiny=lazy("ms_mm.models.deepseek_vl2.tiny:build_tiny"),
    tiny_flags={"--mha": ("mla", False, "plain multi-head attention instead of MLA (as deepseek-vl2-tiny)")},
    embedded_default=EmbeddedDefault(
        name="DeepSeekVL2-tiny", write_demo=lazy(DEMO_WRITER), demo_dir="data/demo_deepseek_vl2",
        demo_data_file="deepseek_vl2_demo_data.jsonl",
        demo_data_json=lazy("ms_mm.models.deepseek_vl2.demo:demo_data_config"),
        model_json=embedded_model_json, hf_dir_key="dataset_param.processor_path",
        hub="deepseek-ai/deepseek-vl2", trust_remote_code=True),
)

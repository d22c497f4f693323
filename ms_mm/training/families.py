"""The model families the trainer knows, and the MindSpeed-MM model.json form of their configs.

Qwen2.5-VL: MindSpeed-MM's `model_*.json` (`image_encoder.vision_encoder`,
`image_encoder.vision_projector`, `text_decoder`, each with its `freeze` switch) is read into
`Qwen2_5_VLConfig`; the ms-mm native form (`{"vision": ..., "text": ...}`, `Qwen2_5_VLConfig.to_dict`)
is accepted too. `qwen2_5_vl_model_json` writes the MindSpeed-MM form back (the example jsons and
the embedded default's tiny model json are made with it).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from ms_mm.training.registry import ModelFamily

# MindSpeed-MM model.json field -> Qwen2_5_VLConfig field
_VISION_FIELDS = {
    "num_layers": "depth", "hidden_size": "hidden_size", "num_attention_heads": "num_heads",
    "ffn_hidden_size": "intermediate_size", "in_channels": "in_channels", "patch_size": "patch_size",
    "temporal_patch_size": "temporal_patch_size", "spatial_merge_size": "spatial_merge_size",
    "window_attn_size": "window_size", "fullatt_block_indexes": "fullatt_block_indexes",
    "tokens_per_second": "tokens_per_second", "layernorm_epsilon": "rms_norm_eps",
    "activation_func": "hidden_act",
}
_TEXT_FIELDS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
    "vocab_size": "vocab_size", "rope_theta": "rope_theta", "mrope_section": "mrope_section",
    "max_position_embeddings": "max_position_embeddings", "layernorm_epsilon": "rms_norm_eps",
    "activation_func": "hidden_act",
}
_TOKEN_FIELDS = {
    "img_context_token_id": "image_token_id", "video_token_id": "video_token_id",
    "vision_start_token_id": "vision_start_token_id", "vision_end_token_id": "vision_end_token_id",
    "vision_token_id": "vision_token_id", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}


def qwen2_5_vl_config_from_model_json(d: Dict[str, Any]):
    from ms_mm.models.qwen2_5_vl import Qwen2_5_VLConfig

    if "vision" in d or "text" in d:      # ms-mm native form
        native = {k: v for k, v in d.items() if k not in ("model_id", "image_encoder", "text_decoder")}
        return Qwen2_5_VLConfig.from_dict(native)
    for key in ("image_encoder", "text_decoder"):
        if not isinstance(d.get(key), dict):
            raise ValueError(f"model json: {key} (an object) is required for model_id {d.get('model_id')!r}")
    enc = d["image_encoder"]
    venc, proj, dec = enc.get("vision_encoder"), enc.get("vision_projector"), d["text_decoder"]
    if not isinstance(venc, dict) or not isinstance(proj, dict):
        raise ValueError("model json: image_encoder.vision_encoder and image_encoder.vision_projector are required")
    vision = {ours: venc[theirs] for theirs, ours in _VISION_FIELDS.items() if theirs in venc}
    if "hidden_size" in proj:
        vision["out_hidden_size"] = proj["hidden_size"]
    text = {ours: dec[theirs] for theirs, ours in _TEXT_FIELDS.items() if theirs in dec}
    if "untie_embeddings_and_output_weights" in dec:
        text["tie_word_embeddings"] = not dec["untie_embeddings_and_output_weights"]
    top = {ours: d[theirs] for theirs, ours in _TOKEN_FIELDS.items() if theirs in d}
    for name, sub, counts_of in (("image_encoder.vision_encoder", venc, "num_layers"),
                                 ("text_decoder", dec, "num_layers")):
        pp = sub.get("pipeline_num_layers")
        if pp is not None and sub.get(counts_of) is not None and sum(pp) != sub[counts_of]:
            raise ValueError(f"model json: {name}.pipeline_num_layers {pp} sums to {sum(pp)}, "
                             f"but {name}.num_layers is {sub[counts_of]}")
    return Qwen2_5_VLConfig.from_dict({**top, "vision": vision, "text": text})


def qwen2_5_vl_model_json(config, *, freeze: Optional[Dict[str, bool]] = None,
                          vit_pp_layers: Optional[List[int]] = None, llm_pp_layers: Optional[List[int]] = None,
                          seq_length: int = 1024) -> Dict[str, Any]:
    """MindSpeed-MM model.json for `config` (freeze: {"vision_encoder", "vision_projector", "text_decoder"})."""
    v, t = config.vision, config.text
    freeze = {"vision_encoder": True, "vision_projector": True, "text_decoder": False, **(freeze or {})}
    return {
        "model_id": "qwen2_5vl",
        "img_context_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_token_id": config.vision_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "image_encoder": {
            "vision_encoder": {
                "model_id": "qwen2vit", "num_layers": v.depth,
                "pipeline_num_layers": list(vit_pp_layers or [v.depth]),
                "hidden_size": v.hidden_size, "ffn_hidden_size": v.intermediate_size,
                "num_attention_heads": v.num_heads, "gated_linear_unit": True,
                "in_channels": v.in_channels, "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
                "layernorm_epsilon": v.rms_norm_eps, "normalization": "RMSNorm", "activation_func": v.hidden_act,
                "tokens_per_second": v.tokens_per_second, "window_attn_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "freeze": bool(freeze["vision_encoder"]),
            },
            "vision_projector": {
                "model_id": "lnmlp", "num_layers": 1, "add_bias_linear": True,
                "input_size": v.hidden_size, "hidden_size": v.out_hidden_size,
                "ffn_hidden_size": v.hidden_size * v.spatial_merge_size ** 2, "activation_func": "gelu",
                "layernorm_epsilon": v.rms_norm_eps, "normalization": "RMSNorm",
                "freeze": bool(freeze["vision_projector"]),
            },
        },
        "text_decoder": {
            "model_id": "qwen2_5_lm", "num_layers": t.num_hidden_layers,
            "pipeline_num_layers": list(llm_pp_layers or [t.num_hidden_layers]),
            "hidden_size": t.hidden_size, "ffn_hidden_size": t.intermediate_size,
            "num_attention_heads": t.num_attention_heads, "group_query_attention": True,
            "num_query_groups": t.num_key_value_heads, "position_embedding_type": "mrope",
            "mrope_section": list(t.mrope_section), "normalization": "RMSNorm", "layernorm_epsilon": t.rms_norm_eps,
            "activation_func": t.hidden_act, "gated_linear_unit": True, "add_bias_linear": False,
            "add_qkv_bias": True, "untie_embeddings_and_output_weights": not t.tie_word_embeddings,
            "seq_length": seq_length, "max_position_embeddings": t.max_position_embeddings,
            "vocab_size": t.vocab_size, "rope_theta": t.rope_theta,
            "freeze": bool(freeze["text_decoder"]),
        },
        "text_encoder": None,
        "video_encoder": None,
    }


def _build_qwen(config, compute_dtype):
    from ms_mm.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(config, compute_dtype=compute_dtype)


def _qwen_loader(data_cfg, config, micro_batch_size, seed, rank, world_size, num_workers, skip_bad_samples):
    from ms_mm.data import build_dataloader

    return build_dataloader(data_cfg, config, micro_batch_size, seed, rank, world_size,
                            num_workers if num_workers else None, skip_bad_samples)


def _llm_tokens(batch) -> int:
    return int(np.asarray(batch["attention_mask"]).sum())


def qwen2_5_vl_family() -> ModelFamily:
    from ms_mm.models.qwen2_5_vl import MODEL_INPUT_NAMES

    return ModelFamily(
        name="qwen2_5_vl", model_ids=("qwen2_5vl", "qwen2_5_vl"),
        config_from_model_json=qwen2_5_vl_config_from_model_json,
        build_model=_build_qwen,
        input_names=MODEL_INPUT_NAMES,
        build_dataloader=_qwen_loader,
        freeze_groups={
            "image_encoder.vision_encoder": ("image_encoder.encoder.",),
            "image_encoder.vision_projector": ("image_encoder.projector.",),
            "text_decoder": ("text_decoder.",),
        },
        count_tokens=_llm_tokens,
    )


# --- DeepSeek-VL2 ------------------------------------------------------------------------------------

def deepseek_vl2_config_from_model_json(d: Dict[str, Any]):
    """MindSpeed-MM model.json (`text_decoder` + `image_encoder`), `{"preset": "tiny"}` or our to_dict() form."""
    from ms_mm.models.deepseek_vl2 import DeepseekVL2Config, config_from_mindspeed

    if "preset" in d:
        return DeepseekVL2Config.preset(d["preset"])
    if "text_decoder" in d:
        return config_from_mindspeed(d)
    return DeepseekVL2Config.from_dict({k: v for k, v in d.items() if k != "model_id"})


def _build_deepseek_vl2(config, compute_dtype):
    from ms_mm.models.deepseek_vl2 import DeepseekVL2ForCausalLM

    return DeepseekVL2ForCausalLM(config, compute_dtype=compute_dtype)


def _supervised_or_all_tokens(batch) -> int:
    if "attention_mask" in batch:
        return int(np.asarray(batch["attention_mask"]).sum())
    return int(np.asarray(batch["input_ids"]).size)


def deepseek_vl2_family() -> ModelFamily:
    from ms_mm.models.deepseek_vl2 import MODEL_INPUT_NAMES

    return ModelFamily(
        name="deepseek_vl2", model_ids=("deepseekvl2", "deepseek_vl2"),
        config_from_model_json=deepseek_vl2_config_from_model_json,
        build_model=_build_deepseek_vl2,
        input_names=MODEL_INPUT_NAMES,
        build_dataloader=_qwen_loader,      # ms_mm.data.build_dataloader dispatches on dataset_type
        freeze_groups={
            "image_encoder.vision_encoder": ("image_encoder.encoder.",),
            "image_encoder.vision_projector": ("image_encoder.projector.", "image_newline", "view_seperator"),
            "text_decoder": ("text_decoder.",),
        },
        count_tokens=_supervised_or_all_tokens,
    )

"""The model families the trainer knows, and the MindSpeed-MM model.json form of their configs.

Qwen2.5-VL: MindSpeed-MM's `model_*.json` (`image_encoder.vision_encoder`,
`image_encoder.vision_projector`, `text_decoder`, each with its `freeze` switch) is read into
`Qwen2_5_VLConfig`; the ms-mm native form (`{"vision": ..., "text": ...}`, `Qwen2_5_VLConfig.to_dict`)
is accepted too. `qwen2_5_vl_model_json` writes the MindSpeed-MM form back (the example jsons and
the embedded default's tiny model json are made with it).

DeepSeek-VL2: MindSpeed-MM's model.json (`text_decoder` in Megatron names, `image_encoder` with the
SigLIP tower and the projector) through `config_from_mindspeed`; `deepseek_vl2_model_json` writes it.
The family also logs the CE loss, the MoE aux loss and the per-layer expert load, and checks that
--expert-model-parallel-size divides the routed experts.
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


def user_freeze(user_model_json: dict, defaults: Dict[str, bool]) -> Dict[str, bool]:
    """The freeze switches of a user's MindSpeed-MM model.json ({"vision_encoder", "vision_projector",
    "text_decoder"}), `defaults` where it has none: the embedded default trains what the real run would."""
    enc = user_model_json.get("image_encoder") or {}
    found = {"vision_encoder": (enc.get("vision_encoder") or {}).get("freeze"),
             "vision_projector": (enc.get("vision_projector") or {}).get("freeze"),
             "text_decoder": (user_model_json.get("text_decoder") or {}).get("freeze")}
    return {k: bool(defaults[k] if v is None else v) for k, v in found.items()}


def qwen2_5_vl_embedded_model_json(hf_dir, user_model_json: dict) -> Dict[str, Any]:
    """model.json of the embedded default's tiny Qwen2.5-VL (HF config in `hf_dir`)."""
    import json
    from pathlib import Path

    from adapters.qwen2_5_vl import config_from_hf

    config = config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
    freeze = user_freeze(user_model_json, {"vision_encoder": True, "vision_projector": True, "text_decoder": False})
    return qwen2_5_vl_model_json(config, freeze=freeze)


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


def deepseek_vl2_model_json(config, *, freeze: Optional[Dict[str, bool]] = None) -> Dict[str, Any]:
    """MindSpeed-MM DeepSeek-VL2 model.json for `config` (read back by `config_from_mindspeed`).

    The SigLIP tower is named by `model_name`; its sizes are written out too, so a tower smaller than
    the named one (the embedded default's tiny model) round-trips. freeze: {"vision_encoder",
    "vision_projector", "text_decoder"} (default: nothing frozen, as the released example).
    """
    from ms_mm.models.deepseek_vl2.config import _MEGATRON_TEXT

    v, p, t = config.vision_config, config.projector_config, config.language_config
    freeze = {"vision_encoder": False, "vision_projector": False, "text_decoder": False, **(freeze or {})}
    text = {"model_id": "deepseek"}
    for theirs, ours in _MEGATRON_TEXT.items():
        value = getattr(t, ours)
        if value is not None:
            text[theirs] = value
    text.update(multi_head_latent_attention=bool(t.use_mla), normalization="RMSNorm", activation_func=t.hidden_act,
                position_embedding_type="rope", gated_linear_unit=True, add_bias_linear=False,
                add_qkv_bias=False, moe_router_load_balancing_type=(
                    "noaux_tc" if t.topk_method == "noaux_tc" else "aux_loss"),
                freeze=bool(freeze["text_decoder"]))
    return {
        "model_id": "DeepSeek-VL2",
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
        "text_decoder": text,
        "image_encoder": {
            "tile_tag": config.tile_tag, "global_view_pos": config.global_view_pos,
            "candidate_resolutions": [list(map(int, r)) for r in config.candidate_resolutions],
            "vision_encoder": {
                "model_id": "SigLip", "model_name": v.model_name, "image_size": v.image_size,
                "patch_size": v.patch_size, "width": v.width, "layers": v.layers, "heads": v.heads,
                "mlp_ratio": v.mlp_ratio, "select_layer": -1, "freeze": bool(freeze["vision_encoder"]),
            },
            "vision_projector": {
                "model_id": "DeepSeekVL2MLP", "projector_type": p.projector_type, "input_dim": p.input_dim,
                "n_embed": p.n_embed, "depth": p.depth, "mlp_ratio": p.mlp_ratio,
                "downsample_ratio": p.downsample_ratio, "freeze": bool(freeze["vision_projector"]),
            },
        },
        "text_encoder": None,
        "video_encoder": None,
    }


def deepseek_vl2_embedded_model_json(hf_dir, user_model_json: dict) -> Dict[str, Any]:
    """model.json of the embedded default's tiny DeepSeek-VL2 (HF config in `hf_dir`)."""
    import json
    from pathlib import Path

    from adapters.deepseek_vl2 import config_from_hf

    config = config_from_hf(json.loads((Path(hf_dir) / "config.json").read_text()))
    freeze = user_freeze(user_model_json, {"vision_encoder": False, "vision_projector": False, "text_decoder": False})
    return deepseek_vl2_model_json(config, freeze=freeze)


def _build_deepseek_vl2(config, compute_dtype):
    from ms_mm.models.deepseek_vl2 import DeepseekVL2ForCausalLM

    return DeepseekVL2ForCausalLM(config, compute_dtype=compute_dtype)


def _deepseek_real_tokens(batch) -> np.ndarray:
    """[B*S] bool: the non-padding positions (a padding key may not attend to itself, so its
    diagonal entry of `attention_bias` [B, 1, S, S] is masked)."""
    bias = np.asarray(batch["attention_bias"])
    return (np.diagonal(bias[:, 0], axis1=1, axis2=2) == 0).reshape(-1)


def _deepseek_llm_tokens(batch) -> int:
    return int(_deepseek_real_tokens(batch).sum())


def deepseek_vl2_step_metrics(config, outputs, batch) -> Dict[str, Any]:
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


def deepseek_vl2_check_parallel_sizes(config, args) -> None:
    ep = args.expert_model_parallel_size
    experts = config.language_config.n_routed_experts
    if ep > 1 and not experts:
        raise ValueError(f"--expert-model-parallel-size {ep}: this model has no routed experts "
                         f"(text_decoder.num_moe_experts is not set)")
    if ep > 1 and experts % ep:
        raise ValueError(f"--expert-model-parallel-size {ep} does not divide the {experts} routed experts "
                         f"(text_decoder.num_moe_experts {experts}): each expert-parallel rank must hold "
                         f"{experts}/{ep} experts")


def deepseek_vl2_family() -> ModelFamily:
    from ms_mm.models.deepseek_vl2 import MODEL_INPUT_NAMES

    return ModelFamily(
        name="deepseek_vl2", model_ids=("deepseekvl2", "deepseek_vl2", "DeepSeek-VL2"),
        config_from_model_json=deepseek_vl2_config_from_model_json,
        build_model=_build_deepseek_vl2,
        input_names=MODEL_INPUT_NAMES,
        build_dataloader=_qwen_loader,      # ms_mm.data.build_dataloader dispatches on dataset_type
        freeze_groups={
            "image_encoder.vision_encoder": ("image_encoder.encoder.",),
            "image_encoder.vision_projector": ("image_encoder.projector.", "image_newline", "view_seperator"),
            "text_decoder": ("text_decoder.",),
        },
        count_tokens=_deepseek_llm_tokens,
        # construct: (loss, logits, ce_loss, aux_losses, routing, routing_weights)
        metric_outputs=(2, 3, 4),
        step_metrics=deepseek_vl2_step_metrics,
        check_parallel_sizes=deepseek_vl2_check_parallel_sizes,
    )

"""Qwen2.5-VL: the HF ⇄ MM weight spec (`SPEC`); the HF config reader is `config.config_from_hf`.

Names follow MindSpeed-MM's renaming (docs/internals.md table). Two HF spellings are read:
transformers 4.57.1 (`text_config` nested; in-memory keys `model.language_model.*`,
`model.visual.*`) and the original Qwen release (LLM fields at the top level; keys `model.*`,
`visual.*`, `lm_head.*`), which is also what we write back.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from convert.spec import Concat, FamilySpec, GroupedRows, Rule
from ms_mm.models.qwen2_5_vl.parallelize import tp_rules as _plan_tp_rules
from ms_mm.training.mm_checkpoint import VLM_PP_STAGES
from ms_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig, config_from_hf

__all__ = ["config_from_hf", "SPEC"]

def _as_config(config) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig.from_dict(config) if isinstance(config, dict) else config


def _rules(config) -> List[Rule]:
    c = _as_config(config)
    v, t = c.vision, c.text
    vd, vh = v.head_dim, v.num_heads
    td, kv = t.head_dim, t.num_key_value_heads
    q_per_group = t.num_attention_heads // kv
    V = "image_encoder.encoder.blocks.layers.{i}."
    L = "text_decoder.decoder.layers.{i}."
    vb = "visual.blocks.{i}."
    lb = "model.layers.{i}."
    merge_in = v.hidden_size * v.spatial_merge_size ** 2
    vision_qkv = GroupedRows(groups=vh, rows=(vd, vd, vd), fused_hf=True)
    text_qkv = GroupedRows(groups=kv, rows=(q_per_group * td, td, td))
    vi, vo, ti, to = v.hidden_size, v.intermediate_size, t.hidden_size, t.intermediate_size
    patch = (vi, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    rules = [
        Rule("image_encoder.encoder.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",),
             hf_shapes=(patch,)),
        Rule(V + "input_layernorm.weight", (vb + "norm1.weight",), over="vit", hf_shapes=((vi,),)),
        Rule(V + "self_attention.linear_qkv.weight", (vb + "attn.qkv.weight",), vision_qkv, "vit",
             ((3 * vi, vi),)),
        Rule(V + "self_attention.linear_qkv.bias", (vb + "attn.qkv.bias",), vision_qkv, "vit", ((3 * vi,),)),
        Rule(V + "self_attention.linear_proj.weight", (vb + "attn.proj.weight",), over="vit", hf_shapes=((vi, vi),)),
        Rule(V + "self_attention.linear_proj.bias", (vb + "attn.proj.bias",), over="vit", hf_shapes=((vi,),)),
        Rule(V + "pre_mlp_layernorm.weight", (vb + "norm2.weight",), over="vit", hf_shapes=((vi,),)),
        Rule(V + "mlp.linear_fc1.weight", (vb + "mlp.gate_proj.weight", vb + "mlp.up_proj.weight"), Concat(2),
             "vit", ((vo, vi), (vo, vi))),
        Rule(V + "mlp.linear_fc1.bias", (vb + "mlp.gate_proj.bias", vb + "mlp.up_proj.bias"), Concat(2),
             "vit", ((vo,), (vo,))),
        Rule(V + "mlp.linear_fc2.weight", (vb + "mlp.down_proj.weight",), over="vit", hf_shapes=((vi, vo),)),
        Rule(V + "mlp.linear_fc2.bias", (vb + "mlp.down_proj.bias",), over="vit", hf_shapes=((vi,),)),
        Rule("image_encoder.projector.layernorm.weight", ("visual.merger.ln_q.weight",), hf_shapes=((vi,),)),
        Rule("image_encoder.projector.encoder.linear_fc1.weight", ("visual.merger.mlp.0.weight",),
             hf_shapes=((merge_in, merge_in),)),
        Rule("image_encoder.projector.encoder.linear_fc1.bias", ("visual.merger.mlp.0.bias",),
             hf_shapes=((merge_in,),)),
        Rule("image_encoder.projector.encoder.linear_fc2.weight", ("visual.merger.mlp.2.weight",),
             hf_shapes=((v.out_hidden_size, merge_in),)),
        Rule("image_encoder.projector.encoder.linear_fc2.bias", ("visual.merger.mlp.2.bias",),
             hf_shapes=((v.out_hidden_size,),)),
        Rule("text_decoder.embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
             hf_shapes=((t.vocab_size, ti),)),
        Rule(L + "input_layernorm.weight", (lb + "input_layernorm.weight",), over="llm", hf_shapes=((ti,),)),
        Rule(L + "self_attention.linear_qkv.weight",
             tuple(lb + f"self_attn.{p}_proj.weight" for p in "qkv"), text_qkv, "llm",
             ((kv * q_per_group * td, ti), (kv * td, ti), (kv * td, ti))),
        Rule(L + "self_attention.linear_qkv.bias",
             tuple(lb + f"self_attn.{p}_proj.bias" for p in "qkv"), text_qkv, "llm",
             ((kv * q_per_group * td,), (kv * td,), (kv * td,))),
        Rule(L + "self_attention.linear_proj.weight", (lb + "self_attn.o_proj.weight",), over="llm",
             hf_shapes=((ti, t.num_attention_heads * td),)),
        Rule(L + "pre_mlp_layernorm.weight", (lb + "post_attention_layernorm.weight",), over="llm",
             hf_shapes=((ti,),)),
        Rule(L + "mlp.linear_fc1.weight", (lb + "mlp.gate_proj.weight", lb + "mlp.up_proj.weight"), Concat(2),
             "llm", ((to, ti), (to, ti))),
        Rule(L + "mlp.linear_fc2.weight", (lb + "mlp.down_proj.weight",), over="llm", hf_shapes=((ti, to),)),
        Rule("text_decoder.decoder.final_layernorm.weight", ("model.norm.weight",), hf_shapes=((ti,),)),
    ]
    if not t.tie_word_embeddings:
        rules.append(Rule("text_decoder.output_layer.weight", ("lm_head.weight",),
                          hf_shapes=((t.vocab_size, ti),)))
    return rules


def _layer_counts(config) -> Dict[str, int]:
    c = _as_config(config)
    return {"vit": c.vision.depth, "llm": c.text.num_hidden_layers}


def _tp_checks(config) -> List[Tuple[str, int]]:
    c = _as_config(config)
    return [("vision attention heads (vision_config.num_heads)", c.vision.num_heads),
            ("LLM key/value heads (num_key_value_heads)", c.text.num_key_value_heads),
            ("LLM attention heads (num_attention_heads)", c.text.num_attention_heads),
            ("vocabulary (vocab_size)", c.text.vocab_size),
            ("LLM MLP width (intermediate_size)", c.text.intermediate_size),
            ("vision MLP width (vision_config.intermediate_size)", c.vision.intermediate_size),
            ("projector width (vision hidden_size * spatial_merge_size^2)",
             c.vision.hidden_size * c.vision.spatial_merge_size ** 2)]


def _tied_copies(config) -> List[Tuple[str, str]]:
    # with pp > 1 the last stage cannot see the embedding: it gets its own copy (MindSpeed-MM does the same)
    if _as_config(config).text.tie_word_embeddings:
        return [("text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight")]
    return []


def _init_tensor(name, shape, rng):
    """Tiny-checkpoint init: token embeddings ~ N(0, 1) (the default rule handles the rest)."""
    if "embed_tokens" in name:
        return rng.standard_normal(shape, dtype=np.float32)
    return None


SPEC = FamilySpec(
    family="qwen2_5_vl",
    converter="Qwen2_5_VLConverter",
    config_from_hf=config_from_hf,
    rules=_rules,
    layer_counts=_layer_counts,
    pp_modules={"vit": ("vit", "vision encoder (vision_config.depth)"),
                "llm": ("llm", "language model (num_hidden_layers)")},
    tp_checks=_tp_checks,
    hf_aliases=((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual."),
                (r"^model\.lm_head\.", "lm_head.")),
    tied_copies=_tied_copies,
    tp_rules=_plan_tp_rules,   # the plan's table (ms_mm.models.qwen2_5_vl.parallelize): one for both
    pp_stages=[dict(s) for s in VLM_PP_STAGES],
    init_tensor=_init_tensor,
)

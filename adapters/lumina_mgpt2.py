"""Lumina-mGPT 2.0 (Chameleon decoder): HF ``config.json`` -> `LuminaMGPT2Config`, and the HF ⇄ MM
weight spec (`SPEC`, converter name `LuminaConverter`).

The HF checkpoint is ``ChameleonXLLMXForConditionalGeneration.save_pretrained`` without
``model.vqmodel.*`` (deleted before training, as ``finetune_solver.py`` does; the image tokenizer is
the separate MoVQGAN family, adapters/movqgan.py). ``L`` = ``text_decoder.decoder.layers.{i}.``,
``hl`` = ``model.layers.{i}.``:

| HF | MM |
|---|---|
| ``model.embed_tokens.weight`` [V, H] | ``text_decoder.embedding.word_embeddings.weight`` |
| ``hl.input_layernorm.weight`` | ``L.input_layernorm.weight`` (after attention when swin_norm) |
| ``hl.self_attn.{q,k,v}_proj.weight`` (+ ``.bias`` if attention_bias) | ``L.self_attention.linear_qkv.weight`` (Megatron layout: per KV group [q heads; k; v]) |
| ``hl.self_attn.q_norm.{weight,bias}`` [mp, head_dim] | ``L.self_attention.q_layernorm.{weight,bias}`` (same shape, rows = model-parallel groups) |
| ``hl.self_attn.k_norm.{weight,bias}`` [mp, head_dim] | ``L.self_attention.k_layernorm.{weight,bias}`` |
| ``hl.self_attn.o_proj.weight`` (+ bias) | ``L.self_attention.linear_proj.weight`` |
| ``hl.post_attention_layernorm.weight`` | ``L.pre_mlp_layernorm.weight`` (after the MLP when swin_norm) |
| ``hl.mlp.{gate,up}_proj.weight`` (+ bias if mlp_bias) | ``L.mlp.linear_fc1.weight`` ([gate; up]) |
| ``hl.mlp.down_proj.weight`` | ``L.mlp.linear_fc2.weight`` |
| ``model.norm.weight`` | ``text_decoder.decoder.final_layernorm.weight`` |
| ``lm_head.weight`` | ``text_decoder.output_layer.weight`` (absent when tie_word_embeddings) |

TP uses the Megatron defaults (qkv / fc1 / embedding / output column, proj / fc2 row); the q/k-norm
rows are replicated. PP splits ``text_decoder.decoder.layers`` (key ``llm``).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from convert.spec import Concat, FamilySpec, GroupedRows, PadRows, Rule
from ms_mm.training.mm_checkpoint import MEGATRON_TP_RULES
from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config, config_from_hf

__all__ = ["config_from_hf", "SPEC"]


def _as_config(config) -> LuminaMGPT2Config:
    return LuminaMGPT2Config.from_dict(config) if isinstance(config, dict) else config


def _rules(config) -> List[Rule]:
    c = _as_config(config)
    H, I, V, d = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    Vp = c.padded_vocab_size   # the MM embedding / output rows: padded (zeros), HF's are not
    nq, nkv, mp = c.num_attention_heads, c.num_key_value_heads, c.model_parallel_size
    qkv = GroupedRows(groups=nkv, rows=((nq // nkv) * d, d, d))
    L = "text_decoder.decoder.layers.{i}."
    hl = "model.layers.{i}."
    rules = [
        Rule("text_decoder.embedding.word_embeddings.weight", ("model.embed_tokens.weight",), PadRows(V, Vp),
             hf_shapes=((V, H),)),
        Rule(L + "input_layernorm.weight", (hl + "input_layernorm.weight",), over="llm", hf_shapes=((H,),)),
        Rule(L + "self_attention.linear_qkv.weight", tuple(hl + f"self_attn.{p}_proj.weight" for p in "qkv"),
             qkv, "llm", ((nq * d, H), (nkv * d, H), (nkv * d, H))),
    ]
    if c.attention_bias:
        rules.append(Rule(L + "self_attention.linear_qkv.bias", tuple(hl + f"self_attn.{p}_proj.bias" for p in "qkv"),
                          qkv, "llm", ((nq * d,), (nkv * d,), (nkv * d,))))
    for mm, hf in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
        for p in ("weight", "bias"):
            rules.append(Rule(L + f"self_attention.{mm}.{p}", (hl + f"self_attn.{hf}.{p}",), over="llm",
                              hf_shapes=((mp, d),)))
    rules.append(Rule(L + "self_attention.linear_proj.weight", (hl + "self_attn.o_proj.weight",), over="llm",
                      hf_shapes=((H, nq * d),)))
    if c.attention_bias:
        rules.append(Rule(L + "self_attention.linear_proj.bias", (hl + "self_attn.o_proj.bias",), over="llm",
                          hf_shapes=((H,),)))
    rules += [
        Rule(L + "pre_mlp_layernorm.weight", (hl + "post_attention_layernorm.weight",), over="llm", hf_shapes=((H,),)),
        Rule(L + "mlp.linear_fc1.weight", (hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"), Concat(2), "llm",
             ((I, H), (I, H))),
    ]
    if c.mlp_bias:
        rules.append(Rule(L + "mlp.linear_fc1.bias", (hl + "mlp.gate_proj.bias", hl + "mlp.up_proj.bias"), Concat(2),
                          "llm", ((I,), (I,))))
    rules.append(Rule(L + "mlp.linear_fc2.weight", (hl + "mlp.down_proj.weight",), over="llm", hf_shapes=((H, I),)))
    if c.mlp_bias:
        rules.append(Rule(L + "mlp.linear_fc2.bias", (hl + "mlp.down_proj.bias",), over="llm", hf_shapes=((H,),)))
    rules.append(Rule("text_decoder.decoder.final_layernorm.weight", ("model.norm.weight",), hf_shapes=((H,),)))
    if not c.tie_word_embeddings:
        rules.append(Rule("text_decoder.output_layer.weight", ("lm_head.weight",), PadRows(V, Vp),
                          hf_shapes=((V, H),)))
    return rules


def _layer_counts(config) -> Dict[str, int]:
    return {"llm": _as_config(config).num_hidden_layers}


def _tp_checks(config) -> List[Tuple[str, int]]:
    c = _as_config(config)
    return [("key/value heads (num_key_value_heads)", c.num_key_value_heads),
            ("attention heads (num_attention_heads)", c.num_attention_heads),
            ("vocabulary rows (vocab_size padded to make_vocab_size_divisible_by)", c.padded_vocab_size),
            ("MLP width (intermediate_size)", c.intermediate_size)]


def _tied_copies(config) -> List[Tuple[str, str]]:
    if _as_config(config).tie_word_embeddings:
        return [("text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight")]
    return []


SPEC = FamilySpec(
    family="lumina_mgpt2",
    converter="LuminaConverter",
    config_from_hf=config_from_hf,
    rules=_rules,
    layer_counts=_layer_counts,
    pp_modules={"llm": ("llm", "language model (num_hidden_layers)")},
    tp_checks=_tp_checks,
    tied_copies=_tied_copies,
    tp_rules=list(MEGATRON_TP_RULES),
    pp_stages=[{"key": "llm", "layers": "text_decoder.decoder.layers.",
                "firsts": ["text_decoder.embedding."],
                "lasts": ["text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."]}],
)

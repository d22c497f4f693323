"""BAGEL-MoT: the release's config files -> `BagelConfig`, and the HF ⇄ MM weight spec (`SPEC`).

A BAGEL checkpoint directory holds `ema.safetensors` (LLM, ViT, connector, generation heads, frozen
position tables), `ae.safetensors` (the FLUX VAE), `llm_config.json`, `vit_config.json`, optionally
`ae_config.json` / `bagel_config.json` (else FLUX / release defaults) and the tokenizer files.
`read_hf_config` assembles those into one dict; `mm_to_hf` writes the two weight files back.

Names (`hl` = `language_model.model.layers.{i}.`, `L` = `text_decoder.decoder.layers.{i}.`,
`hv` = `vit_model.vision_model.`, `V` = `image_encoder.encoder.blocks.layers.{i}.`; every `*_moe_gen`
HF tensor maps to the same MM name with the `_moe_gen` suffix, written `[_moe_gen]`):

| HF (release) | MM |
|---|---|
| `language_model.model.embed_tokens.weight` | `text_decoder.embedding.word_embeddings.weight` |
| `hl.input_layernorm[_moe_gen].weight` | `L.input_layernorm[_moe_gen].weight` |
| `hl.self_attn.{q,k,v}_proj[_moe_gen].{weight,bias}` | `L.self_attention.linear_qkv[_moe_gen].{weight,bias}` (per KV group [q heads; k; v]) |
| `hl.self_attn.q_norm[_moe_gen].weight`, `k_norm[_moe_gen]` | `L.self_attention.q_layernorm[_moe_gen].weight`, `k_layernorm[_moe_gen]` |
| `hl.self_attn.o_proj[_moe_gen].weight` | `L.self_attention.linear_proj[_moe_gen].weight` |
| `hl.post_attention_layernorm[_moe_gen].weight` | `L.pre_mlp_layernorm[_moe_gen].weight` |
| `hl.mlp[_moe_gen].{gate,up}_proj.weight` | `L.mlp[_moe_gen].linear_fc1.weight` ([gate; up]) |
| `hl.mlp[_moe_gen].down_proj.weight` | `L.mlp[_moe_gen].linear_fc2.weight` |
| `language_model.model.norm[_moe_gen].weight` | `text_decoder.decoder.final_layernorm[_moe_gen].weight` |
| `language_model.lm_head.weight` | `text_decoder.output_layer.weight` |
| `hv.embeddings.patch_embedding.{weight,bias}` (Linear form [C, 3*p*p], (p, q, c) columns) | `image_encoder.encoder.patch_embed.proj.{weight,bias}` |
| `hv.embeddings.position_embedding.weight` | `image_encoder.encoder.position_embedding.weight` |
| `hv.encoder.layers.{i}.layer_norm1.*` / `layer_norm2.*` | `V.input_layernorm.*` / `V.pre_mlp_layernorm.*` |
| `hv.encoder.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}` | `V.self_attention.linear_qkv.{weight,bias}` (per head [q_h; k_h; v_h]) |
| `hv.encoder.layers.{i}.self_attn.out_proj.*` | `V.self_attention.linear_proj.*` |
| `hv.encoder.layers.{i}.mlp.fc1.*` / `fc2.*` | `V.mlp.linear_fc1.*` / `V.mlp.linear_fc2.*` |
| `hv.post_layernorm.*` | `image_encoder.encoder.post_layernorm.*` |
| `connector.fc1.*` / `connector.fc2.*` | `image_encoder.projector.encoder.linear_fc1.*` / `linear_fc2.*` |
| `vit_pos_embed.pos_embed`, `latent_pos_embed.pos_embed` (frozen 2-D sin-cos) | same |
| `time_embedder.mlp.{0,2}.*`, `vae2llm.*`, `llm2vae.*` | same |
| `encoder.*`, `decoder.*` (ae.safetensors, FLUX names) | `vae.encoder.*`, `vae.decoder.*` |

TP: `linear_qkv[_moe_gen]`, `word_embeddings`, `output_layer`, the connector's and ViT MLP's
`linear_fc1` column-split; LLM `linear_fc1` gate/up-wise; `linear_proj[_moe_gen]`, `linear_fc2` row;
the rest (norms, generation heads, position tables, VAE) replicated.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from convert.spec import Concat, FamilySpec, GroupedRows, Rule
from ms_mm.models.bagel.config import BagelConfig, config_from_hf

__all__ = ["config_from_hf", "read_hf_config", "vae_tensor_suffixes", "SPEC"]

EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"


def read_hf_config(hf_dir: Path) -> Dict[str, Any]:
    """{"llm_config", "vit_config", "ae_config" (or None), "bagel_config" (or None)} from `hf_dir`."""
    from convert.framework import ConversionError

    out: Dict[str, Any] = {}
    for key, required in (("llm_config", True), ("vit_config", True), ("ae_config", False),
                          ("bagel_config", False)):
        path = Path(hf_dir) / f"{key}.json"
        if not path.is_file():
            if required:
                raise ConversionError(f"{path} not found (a BAGEL checkpoint needs llm_config.json and "
                                      f"vit_config.json)")
            out[key] = None
            continue
        try:
            out[key] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    return out


def _as_config(config) -> BagelConfig:
    return BagelConfig.from_dict(config) if isinstance(config, dict) else config


def vae_tensor_suffixes(config) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every FLUX VAE tensor for this config, in checkpoint order (encoder, decoder)."""
    a = _as_config(config).vae
    out: List[Tuple[str, Tuple[int, ...]]] = []

    def conv(name, cin, cout, k):
        out.extend([(f"{name}.weight", (cout, cin, k, k)), (f"{name}.bias", (cout,))])

    def norm(name, ch):
        out.extend([(f"{name}.weight", (ch,)), (f"{name}.bias", (ch,))])

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(prefix, ch):
        resnet(f"{prefix}.mid.block_1", ch, ch)
        norm(f"{prefix}.mid.attn_1.norm", ch)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{part}", ch, ch, 1)
        resnet(f"{prefix}.mid.block_2", ch, ch)

    levels = len(a.ch_mult)
    conv("encoder.conv_in", a.in_channels, a.ch, 3)
    in_mult = (1,) + tuple(a.ch_mult)
    block_in = a.ch
    for i, mult in enumerate(a.ch_mult):
        block_in = a.ch * in_mult[i]
        for j in range(a.num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, a.ch * mult)
            block_in = a.ch * mult
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * a.z_channels, 3)

    top = a.ch * a.ch_mult[-1]
    conv("decoder.conv_in", a.z_channels, top, 3)
    mid("decoder", top)
    for i in range(levels):  # up.{i} runs from the lowest resolution (i = levels-1) up to i = 0
        block_in = a.ch * a.ch_mult[min(i + 1, levels - 1)]
        for j in range(a.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, a.ch * a.ch_mult[i])
            block_in = a.ch * a.ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    block_in = a.ch * a.ch_mult[0]
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, a.out_ch, 3)
    return out


def _rules(config) -> List[Rule]:
    c = _as_config(config)
    t, v = c.llm, c.vit
    td, kv, heads = t.head_dim, t.num_key_value_heads, t.num_attention_heads
    r = heads // kv
    H, I, V_ = t.hidden_size, t.intermediate_size, t.vocab_size
    vh, vd, vi, vo = v.num_attention_heads, v.head_dim, v.hidden_size, v.intermediate_size
    L = "text_decoder.decoder.layers.{i}."
    hl = "language_model.model.layers.{i}."
    VB = "image_encoder.encoder.blocks.layers.{i}."
    hv = "vit_model.vision_model."
    hb = hv + "encoder.layers.{i}."
    text_qkv = GroupedRows(groups=kv, rows=(r * td, td, td))
    vision_qkv = GroupedRows(groups=vh, rows=(vd, vd, vd))
    qkv_w = ((heads * td, H), (kv * td, H), (kv * td, H))
    qkv_b = ((heads * td,), (kv * td,), (kv * td,))

    rules = [Rule("text_decoder.embedding.word_embeddings.weight", "language_model.model.embed_tokens.weight",
                  hf_shapes=((V_, H),))]
    for sfx in ("", "_moe_gen"):
        rules += [
            Rule(L + f"input_layernorm{sfx}.weight", hl + f"input_layernorm{sfx}.weight", over="llm",
                 hf_shapes=((H,),)),
            Rule(L + f"self_attention.linear_qkv{sfx}.weight",
                 tuple(hl + f"self_attn.{p}_proj{sfx}.weight" for p in "qkv"), text_qkv, "llm", qkv_w),
            Rule(L + f"self_attention.linear_qkv{sfx}.bias",
                 tuple(hl + f"self_attn.{p}_proj{sfx}.bias" for p in "qkv"), text_qkv, "llm", qkv_b),
        ]
        if t.qk_norm:
            rules += [Rule(L + f"self_attention.q_layernorm{sfx}.weight", hl + f"self_attn.q_norm{sfx}.weight",
                           over="llm", hf_shapes=((td,),)),
                      Rule(L + f"self_attention.k_layernorm{sfx}.weight", hl + f"self_attn.k_norm{sfx}.weight",
                           over="llm", hf_shapes=((td,),))]
        rules += [
            Rule(L + f"self_attention.linear_proj{sfx}.weight", hl + f"self_attn.o_proj{sfx}.weight", over="llm",
                 hf_shapes=((H, heads * td),)),
            Rule(L + f"pre_mlp_layernorm{sfx}.weight", hl + f"post_attention_layernorm{sfx}.weight", over="llm",
                 hf_shapes=((H,),)),
            Rule(L + f"mlp{sfx}.linear_fc1.weight", (hl + f"mlp{sfx}.gate_proj.weight", hl + f"mlp{sfx}.up_proj.weight"),
                 Concat(2), "llm", ((I, H), (I, H))),
            Rule(L + f"mlp{sfx}.linear_fc2.weight", hl + f"mlp{sfx}.down_proj.weight", over="llm",
                 hf_shapes=((H, I),)),
        ]
    rules += [
        Rule("text_decoder.decoder.final_layernorm.weight", "language_model.model.norm.weight", hf_shapes=((H,),)),
        Rule("text_decoder.decoder.final_layernorm_moe_gen.weight", "language_model.model.norm_moe_gen.weight",
             hf_shapes=((H,),)),
        Rule("text_decoder.output_layer.weight", "language_model.lm_head.weight", hf_shapes=((V_, H),)),
        Rule("image_encoder.encoder.patch_embed.proj.weight", hv + "embeddings.patch_embedding.weight",
             hf_shapes=((vi, v.patch_dim),)),
        Rule("image_encoder.encoder.patch_embed.proj.bias", hv + "embeddings.patch_embedding.bias",
             hf_shapes=((vi,),)),
        Rule("image_encoder.encoder.position_embedding.weight", hv + "embeddings.position_embedding.weight",
             hf_shapes=((v.num_positions, vi),)),
    ]
    for mm, hf in (("input_layernorm", "layer_norm1"), ("pre_mlp_layernorm", "layer_norm2")):
        for p in ("weight", "bias"):
            rules.append(Rule(VB + f"{mm}.{p}", hb + f"{hf}.{p}", over="vit", hf_shapes=((vi,),)))
    rules += [
        Rule(VB + "self_attention.linear_qkv.weight", tuple(hb + f"self_attn.{p}_proj.weight" for p in "qkv"),
             vision_qkv, "vit", ((vi, vi),) * 3),
        Rule(VB + "self_attention.linear_qkv.bias", tuple(hb + f"self_attn.{p}_proj.bias" for p in "qkv"),
             vision_qkv, "vit", ((vi,),) * 3),
        Rule(VB + "self_attention.linear_proj.weight", hb + "self_attn.out_proj.weight", over="vit",
             hf_shapes=((vi, vi),)),
        Rule(VB + "self_attention.linear_proj.bias", hb + "self_attn.out_proj.bias", over="vit", hf_shapes=((vi,),)),
        Rule(VB + "mlp.linear_fc1.weight", hb + "mlp.fc1.weight", over="vit", hf_shapes=((vo, vi),)),
        Rule(VB + "mlp.linear_fc1.bias", hb + "mlp.fc1.bias", over="vit", hf_shapes=((vo,),)),
        Rule(VB + "mlp.linear_fc2.weight", hb + "mlp.fc2.weight", over="vit", hf_shapes=((vi, vo),)),
        Rule(VB + "mlp.linear_fc2.bias", hb + "mlp.fc2.bias", over="vit", hf_shapes=((vi,),)),
        Rule("image_encoder.encoder.post_layernorm.weight", hv + "post_layernorm.weight", hf_shapes=((vi,),)),
        Rule("image_encoder.encoder.post_layernorm.bias", hv + "post_layernorm.bias", hf_shapes=((vi,),)),
        Rule("image_encoder.projector.encoder.linear_fc1.weight", "connector.fc1.weight", hf_shapes=((H, vi),)),
        Rule("image_encoder.projector.encoder.linear_fc1.bias", "connector.fc1.bias", hf_shapes=((H,),)),
        Rule("image_encoder.projector.encoder.linear_fc2.weight", "connector.fc2.weight", hf_shapes=((H, H),)),
        Rule("image_encoder.projector.encoder.linear_fc2.bias", "connector.fc2.bias", hf_shapes=((H,),)),
        Rule("vit_pos_embed.pos_embed", "vit_pos_embed.pos_embed", hf_shapes=((c.vit_max_num_patch_per_side ** 2, H),)),
        Rule("latent_pos_embed.pos_embed", "latent_pos_embed.pos_embed", hf_shapes=((c.max_latent_size ** 2, H),)),
        Rule("time_embedder.mlp.0.weight", "time_embedder.mlp.0.weight", hf_shapes=((H, c.timestep_frequency_dim),)),
        Rule("time_embedder.mlp.0.bias", "time_embedder.mlp.0.bias", hf_shapes=((H,),)),
        Rule("time_embedder.mlp.2.weight", "time_embedder.mlp.2.weight", hf_shapes=((H, H),)),
        Rule("time_embedder.mlp.2.bias", "time_embedder.mlp.2.bias", hf_shapes=((H,),)),
        Rule("vae2llm.weight", "vae2llm.weight", hf_shapes=((H, c.patch_latent_dim),)),
        Rule("vae2llm.bias", "vae2llm.bias", hf_shapes=((H,),)),
        Rule("llm2vae.weight", "llm2vae.weight", hf_shapes=((c.patch_latent_dim, H),)),
        Rule("llm2vae.bias", "llm2vae.bias", hf_shapes=((c.patch_latent_dim,),)),
    ]
    rules += [Rule(f"vae.{name}", name, hf_shapes=(shape,)) for name, shape in vae_tensor_suffixes(c)]
    return rules


def _layer_counts(config) -> Dict[str, int]:
    c = _as_config(config)
    return {"llm": c.llm.num_hidden_layers, "vit": c.vit.num_hidden_layers}


def _tp_checks(config) -> List[Tuple[str, int]]:
    c = _as_config(config)
    return [("LLM attention heads (num_attention_heads)", c.llm.num_attention_heads),
            ("LLM key/value heads (num_key_value_heads)", c.llm.num_key_value_heads),
            ("vocabulary (vocab_size)", c.llm.vocab_size),
            ("LLM MLP width (intermediate_size)", c.llm.intermediate_size),
            ("LLM hidden size (connector width)", c.llm.hidden_size),
            ("ViT attention heads (vit_config.num_attention_heads)", c.vit.num_attention_heads),
            ("ViT MLP width (vit_config.intermediate_size)", c.vit.intermediate_size)]


def _hf_weight_file(hf_name: str) -> str:
    return AE_FILE if hf_name.startswith(("encoder.", "decoder.")) else EMA_FILE


TP_RULES = [
    (r".*\.projector\.encoder\.linear_fc1\.(weight|bias)$", "col"),
    (r"^image_encoder\.encoder\.blocks\.layers\.\d+\.mlp\.linear_fc1\.(weight|bias)$", "col"),  # GELU MLP, not gated
    (r".*\.self_attention\.linear_qkv(_moe_gen)?\.(weight|bias)$", "col"),
    (r".*\.linear_fc1\.(weight|bias)$", "col_gated"),
    (r".*\.word_embeddings\.weight$", "col"),
    (r".*\.output_layer\.weight$", "col"),
    (r".*\.linear_proj(_moe_gen)?\.weight$", "row"),
    (r".*\.linear_fc2\.weight$", "row"),
]

PP_STAGES = [
    {"key": "vit", "layers": "image_encoder.encoder.blocks.layers.",
     "firsts": ["image_encoder.encoder.patch_embed.", "image_encoder.encoder.position_embedding."],
     "lasts": ["image_encoder.encoder.post_layernorm.", "image_encoder.projector."]},
    # the packed sequence is assembled on the LLM's first stage (text embedding + ViT / latent inputs; the
    # frozen VAE encodes there too), the velocity head sits with the LM head on its last
    {"key": "llm", "layers": "text_decoder.decoder.layers.",
     "firsts": ["text_decoder.embedding.", "vit_pos_embed.", "latent_pos_embed.", "time_embedder.", "vae2llm.",
                "vae."],
     "lasts": ["text_decoder.decoder.final_layernorm.", "text_decoder.decoder.final_layernorm_moe_gen.",
               "text_decoder.output_layer.", "llm2vae."]},
]

SPEC = FamilySpec(
    family="bagel",
    converter="BagelConverter",
    config_from_hf=config_from_hf,
    rules=_rules,
    layer_counts=_layer_counts,
    pp_modules={"vit": ("vit", "vision encoder (vit_config.num_hidden_layers + 1 + vit_select_layer)"),
                "llm": ("llm", "language model (llm_config.num_hidden_layers)")},
    tp_checks=_tp_checks,
    tp_rules=TP_RULES,
    pp_stages=PP_STAGES,
    read_hf_config=read_hf_config,
    hf_weight_file=_hf_weight_file,
)

"""DeepSeek-VL2: HF ``config.json`` → ``DeepseekVL2Config``, and the HF ⇄ MM weight spec (``SPEC``).

HF names are the official release's (``vision.*``, ``projector.layers.*``, ``image_newline``,
``view_seperator``, ``language.model.*``, ``language.lm_head.weight``). MM names follow
MindSpeed-MM's DeepSeek-VL2 converter (docs/internals.md, "DeepSeek-VL2"): the vision tower keeps
its timm names under ``image_encoder.encoder.``, the projector sits under
``image_encoder.projector.``, the decoder uses Megatron names; MLA's ``q_proj`` (or ``q_a_proj``)
and ``kv_a_proj_with_mqa`` are stacked row-wise into ``linear_qkv``; every gate/up pair is fused
into ``linear_fc1`` = [gate; up]. For ``use_mla: false`` (VL2-Tiny) q/k/v become one Megatron
``linear_qkv`` (per KV group [q heads; k; v]), as for the Qwen LLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np

from convert.spec import Concat, FamilySpec, GroupedRows, Layout, Rule, SpecError, StackExperts
from ms_mm.models.deepseek_vl2.config import DeepseekVL2Config, config_from_hf
from ms_mm.models.deepseek_vl2.parallelize import tp_rules as _plan_tp_rules

__all__ = ["config_from_hf", "SPEC", "RowStack"]


@dataclass(frozen=True)
class RowStack(Layout):
    """HF parts with the given row counts stacked on dim 0 (MindSpeed's QKVDirectMergeOp)."""
    rows: Tuple[int, ...]

    @property
    def n_parts(self):
        return len(self.rows)

    def to_mm(self, parts):
        return np.concatenate(parts, axis=0)

    def to_hf(self, full):
        if full.shape[0] != sum(self.rows):
            raise SpecError(f"dim 0 is {full.shape[0]}, expected {sum(self.rows)} = {' + '.join(map(str, self.rows))}")
        return np.split(full, np.cumsum(self.rows)[:-1], axis=0)

    def mm_shape(self, part_shapes):
        got = [s[0] for s in part_shapes]
        trails = {tuple(s[1:]) for s in part_shapes}
        if got != list(self.rows) or len(trails) != 1:
            raise SpecError(f"parts have shapes {[list(s) for s in part_shapes]}; expected dim 0 = "
                            f"{list(self.rows)} and equal trailing dims")
        return (sum(self.rows),) + trails.pop()

    def hf_shapes(self, mm_shape):
        return [(r,) + tuple(mm_shape[1:]) for r in self.rows]


def _as_config(config) -> DeepseekVL2Config:
    return DeepseekVL2Config.from_dict(config) if isinstance(config, dict) else config


def _vision_rules(c: DeepseekVL2Config) -> List[Rule]:
    v, p = c.vision_config, c.projector_config
    w, m, g = v.width, v.mlp_hidden, v.num_patches
    E, hf = "image_encoder.encoder.", "vision."
    B = "blocks.{i}."

    def same(name, shape, over=None):
        return Rule(E + name, (hf + name,), over=over, hf_shapes=(shape,))

    rules = [same("patch_embed.proj.weight", (w, 3, v.patch_size, v.patch_size)),
             same("patch_embed.proj.bias", (w,)),
             same("pos_embed", (1, g, w))]
    for name, shape in (("norm1.weight", (w,)), ("norm1.bias", (w,)), ("attn.qkv.weight", (3 * w, w)),
                        ("attn.qkv.bias", (3 * w,)), ("attn.proj.weight", (w, w)), ("attn.proj.bias", (w,)),
                        ("norm2.weight", (w,)), ("norm2.bias", (w,)), ("mlp.fc1.weight", (m, w)),
                        ("mlp.fc1.bias", (m,)), ("mlp.fc2.weight", (w, m)), ("mlp.fc2.bias", (w,))):
        rules.append(same(B + name, shape, over="vit"))
    rules += [same("norm.weight", (w,)), same("norm.bias", (w,))]
    for name, shape in (("latent", (1, 1, w)), ("q.weight", (w, w)), ("q.bias", (w,)), ("kv.weight", (2 * w, w)),
                        ("kv.bias", (2 * w,)), ("proj.weight", (w, w)), ("proj.bias", (w,)),
                        ("norm.weight", (w,)), ("norm.bias", (w,)), ("mlp.fc1.weight", (m, w)),
                        ("mlp.fc1.bias", (m,)), ("mlp.fc2.weight", (w, m)), ("mlp.fc2.bias", (w,))):
        rules.append(same("attn_pool." + name, shape))
    r2 = p.downsample_ratio ** 2
    inner = p.n_embed * p.mlp_ratio
    dims = [p.input_dim * r2] + [inner] * (p.depth - 1) + [p.n_embed]
    for j in range(p.depth):  # nn.Sequential indices: Linear at 0, 2, 4, ... (GELUs in between)
        name = f"layers.{2 * j}."
        rules.append(Rule("image_encoder.projector." + name + "weight", ("projector." + name + "weight",),
                          hf_shapes=((dims[j + 1], dims[j]),)))
        rules.append(Rule("image_encoder.projector." + name + "bias", ("projector." + name + "bias",),
                          hf_shapes=((dims[j + 1],),)))
    n = p.n_embed
    rules += [Rule("image_newline", ("image_newline",), hf_shapes=((n,),)),
              Rule("view_seperator", ("view_seperator",), hf_shapes=((n,),))]
    return rules


def _mlp_rules(mm: str, hf: str, hidden: int, inter: int) -> List[Rule]:
    return [Rule(mm + "linear_fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"), Concat(2),
                 hf_shapes=((inter, hidden), (inter, hidden))),
            Rule(mm + "linear_fc2.weight", (hf + "down_proj.weight",), hf_shapes=((hidden, inter),))]


def _language_rules(c: DeepseekVL2Config) -> List[Rule]:
    t = c.language_config
    h = t.hidden_size
    rules = [Rule("text_decoder.embedding.word_embeddings.weight", ("language.model.embed_tokens.weight",),
                  hf_shapes=((t.vocab_size, h),))]
    for i in range(t.num_hidden_layers):
        L, lb = f"text_decoder.decoder.layers.{i}.", f"language.model.layers.{i}."
        A, ab = L + "self_attention.", lb + "self_attn."
        rules.append(Rule(L + "input_layernorm.weight", (lb + "input_layernorm.weight",), hf_shapes=((h,),)))
        if t.use_mla:
            heads, qd = t.num_attention_heads, t.q_head_dim
            kv_rows = t.kv_lora_rank + t.qk_rope_head_dim
            if t.q_lora_rank is None:
                q_name, q_rows = ab + "q_proj.weight", heads * qd
            else:
                q_name, q_rows = ab + "q_a_proj.weight", t.q_lora_rank
                rules += [Rule(A + "q_layernorm.weight", (ab + "q_a_layernorm.weight",),
                               hf_shapes=((t.q_lora_rank,),)),
                          Rule(A + "linear_qb.weight", (ab + "q_b_proj.weight",),
                               hf_shapes=((heads * qd, t.q_lora_rank),))]
            rules += [
                Rule(A + "linear_qkv.weight", (q_name, ab + "kv_a_proj_with_mqa.weight"), RowStack((q_rows, kv_rows)),
                     hf_shapes=((q_rows, h), (kv_rows, h))),
                Rule(A + "k_layernorm.weight", (ab + "kv_a_layernorm.weight",), hf_shapes=((t.kv_lora_rank,),)),
                Rule(A + "linear_kvb.weight", (ab + "kv_b_proj.weight",),
                     hf_shapes=((heads * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank),)),
                Rule(A + "linear_proj.weight", (ab + "o_proj.weight",), hf_shapes=((h, heads * t.v_head_dim),)),
            ]
        else:
            kv, d = t.num_key_value_heads, t.head_dim
            rep = t.num_attention_heads // kv
            rules += [
                Rule(A + "linear_qkv.weight", tuple(ab + f"{p}_proj.weight" for p in "qkv"),
                     GroupedRows(groups=kv, rows=(rep * d, d, d)),
                     hf_shapes=((kv * rep * d, h), (kv * d, h), (kv * d, h))),
                Rule(A + "linear_proj.weight", (ab + "o_proj.weight",),
                     hf_shapes=((h, t.num_attention_heads * d),)),
            ]
        rules.append(Rule(L + "pre_mlp_layernorm.weight", (lb + "post_attention_layernorm.weight",),
                          hf_shapes=((h,),)))
        if not t.is_moe_layer(i):
            rules += _mlp_rules(L + "mlp.", lb + "mlp.", h, t.intermediate_size)
            continue
        E = t.n_routed_experts
        rules.append(Rule(L + "mlp.router.weight", (lb + "mlp.gate.weight",), hf_shapes=((E, h),)))
        if t.topk_method == "noaux_tc":
            rules.append(Rule(L + "mlp.router.expert_bias", (lb + "mlp.gate.e_score_correction_bias",),
                              hf_shapes=((E,),)))
        # the routed experts stacked: [E, 2I, H] ([gate_e; up_e] per expert) and [E, H, I]
        mi, X, xb = t.moe_intermediate_size, L + "mlp.experts.", lb + "mlp.experts."
        rules += [Rule(X + "linear_fc1.weight",
                       tuple(xb + f"{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up")),
                       StackExperts(E, 2), hf_shapes=((mi, h),) * (2 * E)),
                  Rule(X + "linear_fc2.weight", tuple(xb + f"{e}.down_proj.weight" for e in range(E)),
                       StackExperts(E, 1), hf_shapes=((h, mi),) * E)]
        if t.n_shared_experts:
            rules += _mlp_rules(L + "mlp.shared_experts.", lb + "mlp.shared_experts.", h,
                                t.moe_intermediate_size * t.n_shared_experts)
    rules.append(Rule("text_decoder.decoder.final_layernorm.weight", ("language.model.norm.weight",),
                      hf_shapes=((h,),)))
    if not t.tie_word_embeddings:
        rules.append(Rule("text_decoder.output_layer.weight", ("language.lm_head.weight",),
                          hf_shapes=((t.vocab_size, h),)))
    return rules


def _rules(config) -> List[Rule]:
    c = _as_config(config)
    return _vision_rules(c) + _language_rules(c)


def _layer_counts(config) -> Dict[str, int]:
    c = _as_config(config)
    return {"vit": c.vision_config.layers, "llm": c.language_config.num_hidden_layers}


def _tp_checks(config) -> List[Tuple[str, int]]:
    t = _as_config(config).language_config
    checks = [("LLM attention heads (num_attention_heads)", t.num_attention_heads),
              ("vocabulary (vocab_size)", t.vocab_size),
              ("dense MLP width (intermediate_size)", t.intermediate_size)]
    if not t.use_mla:
        checks.append(("LLM key/value heads (num_key_value_heads)", t.num_key_value_heads))
    if t.n_routed_experts:
        checks.append(("expert MLP width (moe_intermediate_size)", t.moe_intermediate_size))
    return checks


def _tied_copies(config) -> List[Tuple[str, str]]:
    if _as_config(config).language_config.tie_word_embeddings:
        return [("text_decoder.embedding.word_embeddings.weight", "text_decoder.output_layer.weight")]
    return []


PP_STAGES: List[Dict[str, Any]] = [
    {"key": "vit", "layers": "image_encoder.encoder.blocks.",
     "firsts": ["image_encoder.encoder.patch_embed.", "image_encoder.encoder.pos_embed"],
     "lasts": ["image_encoder.encoder.norm.", "image_encoder.encoder.attn_pool.", "image_encoder.projector.",
               "image_newline", "view_seperator"]},
    {"key": "llm", "layers": "text_decoder.decoder.layers.",
     "firsts": ["text_decoder.embedding."],
     "lasts": ["text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."]},
]

def _init_tensor(name, shape, rng):
    """Tiny-checkpoint init of DeepSeek-VL2's own tensors: token embeddings ~ N(0, 1); the image
    newline / view separator ~ randn(n_embed) / sqrt(n_embed), as upstream."""
    if name in ("image_newline", "view_seperator"):
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32)
    if "embed_tokens" in name:
        return rng.standard_normal(shape, dtype=np.float32)
    return None


SPEC = FamilySpec(
    family="deepseek_vl2",
    converter="DeepSeekVLConverter",
    config_from_hf=config_from_hf,
    rules=_rules,
    layer_counts=_layer_counts,
    pp_modules={"vit": ("vit", "vision encoder (vision_config.layers)"),
                "llm": ("llm", "language model (language_config.num_hidden_layers)")},
    tp_checks=_tp_checks,
    tied_copies=_tied_copies,
    tp_rules=lambda config: _plan_tp_rules(_as_config(config)),   # the plan's table (ms_mm.models.deepseek_vl2.parallelize): one for both
    pp_stages=PP_STAGES,
    # not a transformers model type: upstream (and MindSpeed-MM's converter) load it only with
    # trust_remote_code, so `mm-convert` asks for --cfg.trust_remote_code True (nothing is executed)
    custom_model_types=("deepseek_vl_v2",),
    init_tensor=_init_tensor,
)

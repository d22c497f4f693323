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

from convert.spec import Concat, FamilySpec, GroupedRows, Layout, Rule, SpecError
from ms_mm.models.deepseek_vl2.config import DeepseekVL2Config, LanguageConfig

__all__ = ["config_from_hf", "SPEC", "RowStack"]

_VISION_FIELDS = ("model_name", "image_size", "patch_size", "width", "layers", "heads", "mlp_ratio",
                  "global_pool", "ignore_head", "class_token")
_PROJECTOR_FIELDS = ("projector_type", "input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio",
                     "token_pooling")
_LANGUAGE_FIELDS = tuple(f for f in LanguageConfig.__dataclass_fields__)


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


def config_from_hf(hf: Dict[str, Any]) -> DeepseekVL2Config:
    """Model config from an official DeepSeek-VL2 ``config.json`` dict (unused HF fields are ignored)."""
    if not isinstance(hf, dict):
        raise TypeError(f"config_from_hf expects the parsed config.json dict, got {type(hf).__name__}")
    mt = hf.get("model_type")
    if mt not in (None, "deepseek_vl_v2"):
        raise ValueError(f"config.json model_type is {mt!r}, expected 'deepseek_vl_v2'")
    for key in ("vision_config", "projector_config", "language_config"):
        if not isinstance(hf.get(key), dict):
            raise ValueError(f"config.json has no {key!r} section")
    vis, proj, lang = hf["vision_config"], hf["projector_config"], hf["language_config"]
    language = {k: lang[k] for k in _LANGUAGE_FIELDS if k in lang}
    if "use_mla" not in lang:
        language["use_mla"] = True  # DeepseekV2Config's default
    if not language.get("use_mla", True):
        # MHA configs carry placeholder MLA fields (null / 0): they mean nothing there
        for k in ("kv_lora_rank", "q_lora_rank"):
            language[k] = None
    if language.get("num_key_value_heads") is None:
        language["num_key_value_heads"] = language.get("num_attention_heads")
    d = dict(vision_config={k: vis[k] for k in _VISION_FIELDS if k in vis},
             projector_config={k: proj[k] for k in _PROJECTOR_FIELDS if k in proj},
             language_config=language)
    for k in ("tile_tag", "global_view_pos", "candidate_resolutions"):
        if k in hf:
            d[k] = hf[k]
    return DeepseekVL2Config.from_dict(d)


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
        for e in range(E):
            rules += _mlp_rules(L + f"mlp.experts.local_experts.{e}.", lb + f"mlp.experts.{e}.", h,
                                t.moe_intermediate_size)
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


# TP placement (MindSpeed-MM's deepseek_vl_tp_patterns): the vision tower, projector, router and the
# MLA down-projection ``linear_qkv`` (q ; kv latent ; rope key rows) stay whole on every rank.
TP_RULES: List[Tuple[str, str]] = [
    (r"^text_decoder\.embedding\.word_embeddings\.weight$", "col"),
    (r"^text_decoder\.output_layer\.weight$", "col"),
    (r"^text_decoder\..*\.self_attention\.linear_(qb|kvb)\.weight$", "col"),
    (r"^text_decoder\..*\.self_attention\.linear_proj\.weight$", "row"),
    (r"^text_decoder\..*\.linear_fc1\.weight$", "col_gated"),
    (r"^text_decoder\..*\.linear_fc2\.weight$", "row"),
]

PP_STAGES: List[Dict[str, Any]] = [
    {"key": "vit", "layers": "image_encoder.encoder.blocks.",
     "firsts": ["image_encoder.encoder.patch_embed.", "image_encoder.encoder.pos_embed"],
     "lasts": ["image_encoder.encoder.norm.", "image_encoder.encoder.attn_pool.", "image_encoder.projector.",
               "image_newline", "view_seperator"]},
    {"key": "llm", "layers": "text_decoder.decoder.layers.",
     "firsts": ["text_decoder.embedding."],
     "lasts": ["text_decoder.decoder.final_layernorm.", "text_decoder.output_layer."]},
]

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
    tp_rules=TP_RULES,
    pp_stages=PP_STAGES,
    # not a transformers model type: upstream (and MindSpeed-MM's converter) load it only with
    # trust_remote_code, so `mm-convert` asks for --cfg.trust_remote_code True (nothing is executed)
    custom_model_types=("deepseek_vl_v2",),
)


# ---------------------------------------------------------------------------------------------
# mm-parity hook
# ---------------------------------------------------------------------------------------------

def parity_outputs(config: DeepseekVL2Config, state: Dict[str, np.ndarray], inputs: Dict[str, np.ndarray],
                   gradients: Tuple[str, ...] = ("grad",)) -> Tuple[Dict[str, np.ndarray], Dict[str, Dict[str, np.ndarray]]]:
    """Run the MM-named ``state`` on one upstream processor batch, in graph mode, fp32.

    Returns ``(outputs, grads)``. ``outputs`` uses the keys of the reference fixtures'
    ``outputs.npz``: ``logits``, ``loss`` (CE), ``images_embeds``, ``inputs_embeds`` and, per MoE
    layer L, ``moe.layer{L}.topk_idx`` / ``topk_weight`` (each row sorted by expert id: upstream's
    top-k order is unspecified) / ``aux_loss``. ``grads`` maps each requested kind to MM-named
    gradients: ``"grad"`` of CE + sum(aux) (upstream's training gradient), ``"grad_ce_only"`` of CE.
    Map them to HF names with ``convert.mm_grads_to_hf("deepseek_vl2", config, ...)``.
    """
    import mindspore as ms

    from ms_mm.training.weights import load_state_dict
    from ms_mm.models.deepseek_vl2 import MODEL_INPUT_NAMES, DeepseekVL2ForCausalLM, build_model_inputs

    unknown = [g for g in gradients if g not in ("grad", "grad_ce_only")]
    if unknown:
        raise ValueError(f"parity_outputs: unknown gradient kind(s) {unknown}; expected 'grad' or 'grad_ce_only'")
    net = load_state_dict(DeepseekVL2ForCausalLM(config), state)
    feed = build_model_inputs(inputs, config)
    args = [ms.Tensor(feed[k]) for k in MODEL_INPUT_NAMES]
    weights = net.trainable_params()

    def ce_only(*a):
        out = net(*a)
        return out[2], out

    grads: Dict[str, Dict[str, np.ndarray]] = {}
    if "grad" in gradients:  # objective = first output = CE + sum(aux)
        result, g = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))(*args)
        grads["grad"] = {p.name: x.asnumpy() for p, x in zip(weights, g)}
    if "grad_ce_only" in gradients:
        (_, result), g = ms.jit(ms.value_and_grad(ce_only, None, weights, has_aux=True))(*args)
        grads["grad_ce_only"] = {p.name: x.asnumpy() for p, x in zip(weights, g)}
    if not gradients:
        result = net(*args)
    _, logits, ce, aux, routing, routing_weights = (r.asnumpy() for r in result)

    tensors = {k: ms.Tensor(feed[k]) for k in ("input_ids", "pixel_values", "image_token_index", "images_seq_mask")}
    out = {"logits": logits, "loss": np.asarray(ce, np.float32).reshape(()),
           "images_embeds": net.image_encoder(tensors["pixel_values"]).asnumpy(),
           "inputs_embeds": net.embed(tensors["input_ids"], tensors["pixel_values"], tensors["image_token_index"],
                                      tensors["images_seq_mask"]).asnumpy()}
    moe_layers = [i for i in range(config.language_config.num_hidden_layers) if config.language_config.is_moe_layer(i)]
    for j, layer in enumerate(moe_layers):
        order = np.argsort(routing[j], axis=-1, kind="stable")
        out[f"moe.layer{layer}.topk_idx"] = np.take_along_axis(routing[j], order, -1).astype(np.int64)
        out[f"moe.layer{layer}.topk_weight"] = np.take_along_axis(routing_weights[j], order, -1)
        out[f"moe.layer{layer}.aux_loss"] = np.asarray(aux[j], np.float32).reshape(())
    return out, grads


def run_parity(hf_dir, inputs: Dict[str, np.ndarray], grad_names: List[str]) -> Dict[str, np.ndarray]:
    """``mm-parity deepseek_vl2`` runner (``convert.parity`` signature): load ``hf_dir`` through the
    converter, run ``parity_outputs`` and add ``grad.<name>`` (CE + aux objective) for each
    requested HF tensor name."""
    import convert  # the converter layer sits above adapters; imported only when the CLI runs

    config, state = convert.load_hf_as_mm(hf_dir, "deepseek_vl2")
    missing = [k for k in ("input_ids", "images", "images_seq_mask", "images_spatial_crop") if k not in inputs]
    if missing:
        raise ValueError(f"inputs: missing key(s) {missing} (have {sorted(inputs)}); expected the "
                         f"DeepseekVLV2Processor batch")
    out, grads = parity_outputs(config, state, inputs, gradients=("grad",) if grad_names else ())
    if grad_names:
        hf_grads = convert.mm_grads_to_hf("deepseek_vl2", config, grads["grad"])
        for name in grad_names:
            if name not in hf_grads:
                close = [k for k in sorted(hf_grads) if k.split(".")[-2:] == name.split(".")[-2:]][:5]
                raise ValueError(f"--grad {name}: not a trainable deepseek_vl2 checkpoint tensor"
                                 + (f" (e.g. {', '.join(close)})" if close else ""))
            out[f"grad.{name}"] = hf_grads[name]
    return out

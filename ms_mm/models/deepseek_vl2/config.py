"""DeepSeek-VL2 configuration: SigLIP vision tower, downsample-MLP projector, DeepSeekMoE decoder.

Field names follow the upstream ``config.json`` (``vision_config`` / ``projector_config`` /
``language_config`` plus ``tile_tag``, ``global_view_pos``, ``candidate_resolutions``) so the two
can be read side by side. ``validate()`` names the first bad field and why. Presets:
``tiny`` (the shape of the shared parity fixture) and the released ``Tiny`` / ``Small`` / ``Base``
(deepseek-ai/deepseek-vl2-tiny, -small, deepseek-vl2).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ms_mm.models import check_int

SCORING_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")   # Megatron's --moe-token-drop-policy (ms_mm.ops.moe.DROP_POLICIES)
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
PROJECTOR_TYPES = ("downsample_mlp_gelu",)


@dataclass
class VisionConfig:
    """timm-style SigLIP ViT (no class token; LayerNorm eps 1e-6 and gelu-tanh are fixed upstream)."""
    model_name: str = "siglip_so400m_patch14_384"
    image_size: int = 384
    patch_size: int = 14
    width: int = 1152
    layers: int = 27
    heads: int = 16
    mlp_ratio: float = 3.7362
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size  # the stride-p conv drops the remainder (384/14 -> 27)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)  # timm truncates (so400m: 1152 * 3.7362 -> 4304)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def validate(self, prefix="vision_config"):
        for name in ("image_size", "patch_size", "width", "layers", "heads"):
            check_int(self, name, prefix)
        if self.width % self.heads:
            raise ValueError(f"{prefix}.width={self.width} is not divisible by {prefix}.heads={self.heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"{prefix}.image_size={self.image_size} is smaller than "
                             f"{prefix}.patch_size={self.patch_size}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"{prefix}.mlp_ratio={self.mlp_ratio!r}: expected > 0")
        if self.class_token:
            raise ValueError(f"{prefix}.class_token=True: DeepSeek-VL2 tiles have no class token")
        if not self.ignore_head:
            raise ValueError(f"{prefix}.ignore_head=False: the attention-pool head output is not "
                             f"consumed by DeepSeek-VL2 (patch features feed the projector)")


@dataclass
class ProjectorConfig:
    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False

    def validate(self, prefix="projector_config"):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"{prefix}.projector_type={self.projector_type!r}: supported {PROJECTOR_TYPES}")
        for name in ("input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio"):
            check_int(self, name, prefix)
        if self.depth < 2:
            raise ValueError(f"{prefix}.depth={self.depth}: downsample_mlp_gelu needs depth >= 2")
        if self.token_pooling:
            raise ValueError(f"{prefix}.token_pooling=True is not supported (unused by released models)")


@dataclass
class LanguageConfig:
    """DeepSeek-V2 style decoder: MLA or plain MHA attention, dense first layers, then MoE."""
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    use_mla: bool = True
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: Optional[int] = 64
    n_shared_experts: Optional[int] = 2
    num_experts_per_tok: Optional[int] = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: Optional[int] = 1
    topk_group: Optional[int] = 1
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # Megatron's drop and pad (--moe-expert-capacity-factor / --moe-token-drop-policy): None = dropless,
    # as upstream; a factor caps each expert at ceil(tokens * k / E * factor) tokens of a rank's micro batch
    moe_expert_capacity_factor: Optional[float] = None
    moe_token_drop_policy: str = "probs"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: Optional[int] = None

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """MHA head size (``use_mla: false``: hidden / heads, as LlamaAttention)."""
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    def validate(self, prefix="language_config"):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "moe_layer_freq"):
            check_int(self, name, prefix)
        check_int(self, "first_k_dense_replace", prefix, minimum=0)
        if self.hidden_act != "silu":
            raise ValueError(f"{prefix}.hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.rope_scaling is not None:
            raise ValueError(f"{prefix}.rope_scaling={self.rope_scaling!r}: RoPE scaling is not supported "
                             f"(the released DeepSeek-VL2 configs use null)")
        if self.attention_bias:
            raise ValueError(f"{prefix}.attention_bias=True is not supported (released models use false)")
        if self.use_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                check_int(self, name, prefix)
            if self.q_lora_rank is not None:
                check_int(self, "q_lora_rank", prefix)
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"{prefix}.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE pairs)")
            if self.num_key_value_heads != self.num_attention_heads:
                raise ValueError(f"{prefix}.num_key_value_heads={self.num_key_value_heads}: MLA expands "
                                 f"the latent to all {self.num_attention_heads} heads, so it must equal "
                                 f"num_attention_heads")
        else:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
                                 f"{prefix}.num_attention_heads={self.num_attention_heads}")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(f"{prefix}.num_attention_heads={self.num_attention_heads} is not a "
                                 f"multiple of {prefix}.num_key_value_heads={self.num_key_value_heads}")
            if self.head_dim % 2:
                raise ValueError(f"{prefix}: head_dim={self.head_dim} must be even (RoPE halves)")
        if self.n_routed_experts is None:
            return
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
            check_int(self, name, prefix)
        if self.n_shared_experts is not None:
            check_int(self, "n_shared_experts", prefix, minimum=0)
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"{prefix}.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                             f"n_routed_experts={self.n_routed_experts}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"{prefix}.scoring_func={self.scoring_func!r}: unknown MoE scoring function, "
                             f"expected one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"{prefix}.topk_method={self.topk_method!r}: expected one of {TOPK_METHODS}")
        if self.topk_method != "greedy":
            check_int(self, "n_group", prefix)
            check_int(self, "topk_group", prefix)
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"{prefix}.n_routed_experts={self.n_routed_experts} is not divisible by "
                                 f"n_group={self.n_group}")
            if self.topk_group > self.n_group:
                raise ValueError(f"{prefix}.topk_group={self.topk_group} exceeds n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_group * per_group < self.num_experts_per_tok:
                raise ValueError(f"{prefix}: topk_group*experts_per_group={self.topk_group * per_group} "
                                 f"< num_experts_per_tok={self.num_experts_per_tok}")
            if self.topk_method == "noaux_tc" and per_group < 2:
                raise ValueError(f"{prefix}: noaux_tc scores groups by their top-2 experts; "
                                 f"n_routed_experts/n_group={per_group} < 2")
        if self.aux_loss_alpha < 0:
            raise ValueError(f"{prefix}.aux_loss_alpha={self.aux_loss_alpha}: expected >= 0")
        factor = self.moe_expert_capacity_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
            raise ValueError(f"{prefix}.moe_expert_capacity_factor={factor!r}: expected a number > 0 "
                             f"(or null: no capacity, nothing dropped)")
        if self.moe_token_drop_policy not in DROP_POLICIES:
            raise ValueError(f"{prefix}.moe_token_drop_policy={self.moe_token_drop_policy!r}: expected one of "
                             f"{DROP_POLICIES}")


@dataclass
class DeepseekVL2Config:
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projector_config: ProjectorConfig = field(default_factory=ProjectorConfig)
    language_config: LanguageConfig = field(default_factory=LanguageConfig)
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: List[Tuple[int, int]] = field(default_factory=lambda: [[384, 384]])

    @property
    def tokens_per_tile_side(self) -> int:
        """h = w of the projector output grid of one tile (ceil(grid / downsample))."""
        g = self.vision_config.grid
        r = self.projector_config.downsample_ratio
        return -(-g // r)

    def validate(self):
        self.vision_config.validate()
        self.projector_config.validate()
        self.language_config.validate()
        if self.tile_tag != "2D":
            raise ValueError(f"tile_tag={self.tile_tag!r}: only '2D' is supported (upstream abandoned '1D')")
        if self.global_view_pos not in ("head", "tail"):
            raise ValueError(f"global_view_pos={self.global_view_pos!r}: expected 'head' or 'tail'")
        if self.projector_config.input_dim != self.vision_config.width:
            raise ValueError(f"projector_config.input_dim={self.projector_config.input_dim} != "
                             f"vision_config.width={self.vision_config.width}")
        if self.projector_config.n_embed != self.language_config.hidden_size:
            raise ValueError(f"projector_config.n_embed={self.projector_config.n_embed} != "
                             f"language_config.hidden_size={self.language_config.hidden_size}")
        if not self.candidate_resolutions:
            raise ValueError("candidate_resolutions is empty")
        tile = self.vision_config.image_size
        for i, res in enumerate(self.candidate_resolutions):
            if len(res) != 2 or any((not isinstance(v, int)) or v <= 0 or v % tile for v in res):
                raise ValueError(f"candidate_resolutions[{i}]={list(res)!r}: expected [width, height], "
                                 f"positive multiples of vision_config.image_size={tile}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeepseekVL2Config":
        d = dict(d)
        sub = {"vision_config": VisionConfig, "projector_config": ProjectorConfig,
               "language_config": LanguageConfig}
        kwargs = {}
        for name, klass in sub.items():
            kwargs[name] = _build(klass, d.pop(name, {}) or {}, name)
        known = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k not in known:
                raise ValueError(f"DeepseekVL2Config: unknown field {k!r}")
            kwargs[k] = v
        if "candidate_resolutions" in kwargs:
            kwargs["candidate_resolutions"] = [list(r) for r in kwargs["candidate_resolutions"]]
        return cls(**kwargs).validate()

    @classmethod
    def preset(cls, name: str) -> "DeepseekVL2Config":
        if name not in _PRESETS:
            raise ValueError(f"DeepseekVL2Config.preset: unknown preset {name!r}, expected one of {sorted(_PRESETS)}")
        return cls.from_dict(copy.deepcopy(_PRESETS[name]))


def _build(klass, values: dict, prefix: str):
    known = {f.name for f in dataclasses.fields(klass)}
    bad = sorted(set(values) - known)
    if bad:
        raise ValueError(f"{prefix}: unknown field(s) {bad}")
    return klass(**values)


# The released tiling grid: (m*384, n*384) for 1 <= m, n and m*n <= 9, in the upstream order.
_RELEASED_RESOLUTIONS = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
    [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
    [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
    [3456, 384], [1152, 1152]]

_SO400M = dict(model_name="siglip_so400m_patch14_384", image_size=384, patch_size=14, width=1152,
               layers=27, heads=16, mlp_ratio=3.7362)


def _released(n_embed, language):
    return dict(vision_config=dict(_SO400M),
                projector_config=dict(input_dim=1152, n_embed=n_embed, depth=2, mlp_ratio=1,
                                      downsample_ratio=2),
                language_config=language, tile_tag="2D", global_view_pos="head",
                candidate_resolutions=copy.deepcopy(_RELEASED_RESOLUTIONS))


_PRESETS = {
    # The shared parity fixture (../shared/fixtures/deepseek_vl2/forward).
    "tiny": dict(
        vision_config=dict(image_size=70, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=2.0),
        projector_config=dict(input_dim=32, n_embed=64, depth=2, mlp_ratio=1, downsample_ratio=2),
        language_config=dict(vocab_size=384, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, use_mla=True,
                             q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                             first_k_dense_replace=1, max_position_embeddings=1024, bos_token_id=347,
                             eos_token_id=348, pad_token_id=349),
        candidate_resolutions=[[70, 70], [70, 140], [140, 70], [140, 140]]),
    # deepseek-ai/deepseek-vl2-tiny (DeepSeekMoE-3B, 1.0B activated): plain MHA.
    "Tiny": _released(1280, dict(
        vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
        num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=10, use_mla=False,
        q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0)),
    # deepseek-ai/deepseek-vl2-small (DeepSeekMoE-16B, 2.8B activated): MLA without q compression.
    "Small": _released(2048, dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, use_mla=True,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0)),
    # deepseek-ai/deepseek-vl2 (DeepSeekMoE-27B, 4.5B activated): sigmoid routing with expert bias.
    "Base": _released(2560, dict(
        vocab_size=129280, hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, use_mla=True,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=72, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        topk_method="noaux_tc", n_group=1, topk_group=1, scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.0)),
}


# ----------------------------------------------------------------------------- MindSpeed-MM model.json

# SigLIP towers by timm name (upstream siglip_vit.SigLIP_MODEL_CONFIG): the model.json names one.
SIGLIP_TOWERS = {
    "siglip_so400m_patch14_384": dict(image_size=384, patch_size=14, width=1152, layers=27, heads=16,
                                      mlp_ratio=3.7362),
    "siglip_so400m_patch14_224": dict(image_size=224, patch_size=14, width=1152, layers=27, heads=16,
                                      mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0),
}

# Megatron / MindSpeed-MM text_decoder field -> LanguageConfig field
_MEGATRON_TEXT = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads", "ffn_hidden_size": "intermediate_size",
    "moe_intermediate_size": "moe_intermediate_size", "layernorm_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size", "rotary_base": "rope_theta", "max_position_embeddings": "max_position_embeddings",
    "first_k_dense_replace": "first_k_dense_replace", "moe_layer_freq": "moe_layer_freq",
    "num_moe_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts", "n_group": "n_group",
    "topk_group": "topk_group", "norm_topk_prob": "norm_topk_prob", "moe_router_topk": "num_experts_per_tok",
    "moe_router_score_function": "scoring_func", "routed_scaling_factor": "routed_scaling_factor",
    "moe_aux_loss_coeff": "aux_loss_alpha", "seq_aux": "seq_aux", "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank", "qk_rope_head_dim": "qk_rope_head_dim", "qk_nope_head_dim": "qk_nope_head_dim",
    "v_head_dim": "v_head_dim", "tie_word_embeddings": "tie_word_embeddings",
    "moe_expert_capacity_factor": "moe_expert_capacity_factor", "moe_token_drop_policy": "moe_token_drop_policy",
}


def _released_grid(tile: int):
    """The released candidate resolutions with the 384 px tile replaced by `tile`."""
    return [[w // 384 * tile, h // 384 * tile] for w, h in _RELEASED_RESOLUTIONS]


def config_from_mindspeed(model_json: dict, candidate_resolutions=None, **language_overrides) -> DeepseekVL2Config:
    """Our config from a MindSpeed-MM DeepSeek-VL2 ``model.json`` (``text_decoder`` with Megatron
    names, ``image_encoder.vision_encoder`` naming a SigLIP tower, ``image_encoder.vision_projector``).

    MindSpeed passes the MLA sizes on the command line (``--multi-head-latent-attention
    --qk-rope-head-dim 64 --qk-nope-head-dim 128 --kv-lora-rank 512 --v-head-dim 128``): they are
    read from ``text_decoder`` when present, else from ``language_overrides``, else those released
    values. ``image_encoder.vision_encoder`` may override the named tower's sizes (``image_size``,
    ``patch_size``, ``width``, ``layers``, ``heads``, ``mlp_ratio``). ``candidate_resolutions``
    (the processor's) comes from the argument, else ``image_encoder.candidate_resolutions``, else
    the released grid (m x n tiles, m*n <= 9) of the tower's tile size.
    """
    if not isinstance(model_json, dict):
        raise TypeError(f"model.json: expected a dict, got {type(model_json).__name__}")
    for key in ("text_decoder", "image_encoder"):
        if not isinstance(model_json.get(key), dict):
            raise ValueError(f"model.json has no {key!r} section")
    text, image = model_json["text_decoder"], model_json["image_encoder"]
    vision_json = image.get("vision_encoder") or {}
    projector_json = image.get("vision_projector") or {}

    name = vision_json.get("model_name", "siglip_so400m_patch14_384")
    if name not in SIGLIP_TOWERS:
        raise ValueError(f"model.json image_encoder.vision_encoder.model_name={name!r}: expected one of "
                         f"{sorted(SIGLIP_TOWERS)}")
    vision = dict(SIGLIP_TOWERS[name], model_name=name)
    # the tower preset's sizes, each overridable (a smaller or custom tower keeps the preset's name)
    for key in ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio"):
        if key in vision_json:
            vision[key] = vision_json[key]
    select = vision_json.get("select_layer", -1)  # upstream create_siglip_vit: keep blocks up to it
    vision["layers"] = min(vision["layers"], vision["layers"] + select + 1) if select <= 0 else \
        min(vision["layers"], select)

    language = dict(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    language.update(language_overrides)
    for src, dst in _MEGATRON_TEXT.items():
        if src in text:
            language[dst] = text[src]
    score = text.get("moe_router_score_function")
    if score is not None and score not in SCORING_FUNCS:   # name the model.json key, not ours
        raise ValueError(f"model.json text_decoder.moe_router_score_function={score!r}: unknown MoE scoring "
                         f"function, expected one of {list(SCORING_FUNCS)}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):   # top level, as Qwen2.5-VL's model.json
        if key in model_json:
            language[key] = model_json[key]
    language["use_mla"] = bool(text.get("multi_head_latent_attention", language.get("use_mla", True)))
    balancing = text.get("moe_router_load_balancing_type")
    if balancing is not None:
        language["topk_method"] = "noaux_tc" if balancing == "noaux_tc" else language.get("topk_method", "greedy")
    if not language["use_mla"]:
        language.update(q_lora_rank=None, kv_lora_rank=None)

    projector = {k: projector_json[k] for k in ("projector_type", "input_dim", "n_embed", "depth", "mlp_ratio",
                                                 "downsample_ratio") if k in projector_json}
    d = dict(vision_config=vision, projector_config=projector, language_config=language,
             candidate_resolutions=copy.deepcopy(candidate_resolutions or image.get("candidate_resolutions")
                                                 or _released_grid(vision["image_size"])))
    for key in ("tile_tag", "global_view_pos"):
        if key in image:
            d[key] = image[key]
    return DeepseekVL2Config.from_dict(d)


# ---------------------------------------------------------------------------- HF config.json
_VISION_FIELDS = ("model_name", "image_size", "patch_size", "width", "layers", "heads", "mlp_ratio",
                  "global_pool", "ignore_head", "class_token")
_PROJECTOR_FIELDS = ("projector_type", "input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio",
                     "token_pooling")
_LANGUAGE_FIELDS = tuple(f for f in LanguageConfig.__dataclass_fields__)


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


# ------------------------------------------------------------------- every json form, one reader
# dry-run / CLI preset names -> `DeepseekVL2Config.preset` names
PRESET_NAMES = {"tiny-deepseek": "tiny", "deepseek-vl2-tiny": "Tiny", "deepseek-vl2-small": "Small",
                "deepseek-vl2": "Base", "deepseek-vl2-base": "Base"}


def claims_json(d: Dict[str, Any]) -> bool:
    """A DeepSeek-VL2 json without model_id: HF ``config.json`` / our ``to_dict()`` (``language_config``),
    a preset override, or a MindSpeed-MM ``model.json`` with a SigLIP tower or MoE/MLA ``text_decoder``."""
    if "language_config" in d or d.get("model_type") == "deepseek_vl_v2":
        return True
    if str(d.get("preset", "")) in PRESET_NAMES:  # ("tiny" alone is Qwen2.5-VL's)
        return True
    if isinstance(d.get("text_decoder"), dict):
        vision = (d.get("image_encoder") or {}).get("vision_encoder") or {}
        text = d["text_decoder"]
        return (str(vision.get("model_name", "")).startswith("siglip")
                or "num_moe_experts" in text or "multi_head_latent_attention" in text)
    return False


def config_from_json(d: Dict[str, Any]) -> DeepseekVL2Config:
    """Any json form of this family: MindSpeed-MM ``model.json`` (``text_decoder`` + ``image_encoder``),
    the HF ``config.json`` (``model_type``), ``{"preset": name, ...overrides}`` (dry-run or config preset
    names; nested sections merge into the preset's) or our ``to_dict()`` form. Keys with no meaning
    here are listed on stderr."""
    if "text_decoder" in d:
        return config_from_mindspeed(d)
    if "model_type" in d:
        return config_from_hf(d)
    merged: Dict[str, Any] = {}
    if "preset" in d:
        merged = DeepseekVL2Config.preset(PRESET_NAMES.get(d["preset"], d["preset"])).to_dict()
    for key, value in d.items():
        if key in ("preset", "model_id"):
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    known = {f.name for f in dataclasses.fields(DeepseekVL2Config)}
    dropped = sorted(k for k in merged if k not in known)
    if dropped:
        print(f"ms-mm: ignored DeepSeek-VL2 model json key(s): {', '.join(dropped)}", file=sys.stderr)
    return DeepseekVL2Config.from_dict({k: v for k, v in merged.items() if k in known})


def mindspeed_model_json(config, *, freeze: Optional[Dict[str, bool]] = None) -> Dict[str, Any]:
    """MindSpeed-MM DeepSeek-VL2 model.json for `config` (read back by `config_from_mindspeed`).

    The SigLIP tower is named by `model_name`; its sizes are written out too, so a tower smaller than
    the named one (the embedded default's tiny model) round-trips. freeze: {"vision_encoder",
    "vision_projector", "text_decoder"} (default: nothing frozen, as the released example).
    """
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

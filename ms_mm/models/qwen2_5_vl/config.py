"""Qwen2.5-VL configuration: vision tower, Qwen2 text decoder and the special token ids.

Field names follow the upstream HF config (``vision_config`` / ``text_config``) so a reader can
compare them side by side; ``validate()`` names the first bad field and why. Presets carry the
released hyper-parameters of Qwen2.5-VL-3B/7B/32B/72B-Instruct plus the ``tiny`` shape of the
shared parity fixture.

Config forms read here, each by one function: the HF `config.json` (`config_from_hf`: transformers
4.57.1 nested or the original flat release), MindSpeed-MM's `model_*.json` (`config_from_mindspeed`;
`mindspeed_model_json` writes it), our `to_dict()` form and `{"preset": name, ...overrides}`;
`config_from_json` picks the reader for any of them (the trainer, the launcher and the dry run all
call it), `claims_json` says whether a json without `model_id` is one of ours.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ms_mm.models import check_int


@dataclass
class Qwen2_5_VLVisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # in pixels; the attention window is window_size // patch // merge units
    fullatt_block_indexes: List[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6  # hard-coded upstream for both the blocks and the merger
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    def validate(self, prefix: str = "vision") -> None:
        for name in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
                     "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size"):
            check_int(self, name, prefix)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
                             f"{prefix}.num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"{prefix}: head_dim={self.head_dim} must be a multiple of 4 "
                             f"(2-D rotary splits it into h and w halves of rotate-half pairs)")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit or self.window_size < unit:
            raise ValueError(f"{prefix}.window_size={self.window_size} must be a positive multiple of "
                             f"patch_size*spatial_merge_size={unit}")
        for i in self.fullatt_block_indexes:
            if not isinstance(i, int) or not 0 <= i < self.depth:
                raise ValueError(f"{prefix}.fullatt_block_indexes has {i!r}, outside [0, depth={self.depth})")
        if self.hidden_act != "silu":
            raise ValueError(f"{prefix}.hidden_act={self.hidden_act!r}: only 'silu' is implemented")


@dataclass
class Qwen2_5_VLTextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, prefix: str = "text") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            check_int(self, name, prefix)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
                             f"{prefix}.num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{prefix}.num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"{prefix}.num_key_value_heads={self.num_key_value_heads}")
        if len(self.mrope_section) != 3 or any(not isinstance(s, int) or s < 0 for s in self.mrope_section):
            raise ValueError(f"{prefix}.mrope_section={self.mrope_section!r}: expected 3 non-negative ints (t, h, w)")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"{prefix}.mrope_section={self.mrope_section} sums to {sum(self.mrope_section)} "
                             f"frequency pairs, but head_dim/2 = {self.head_dim // 2}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"{prefix}.rms_norm_eps={self.rms_norm_eps} must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"{prefix}.rope_theta={self.rope_theta} must be > 0")
        if self.hidden_act != "silu":
            raise ValueError(f"{prefix}.hidden_act={self.hidden_act!r}: only 'silu' is implemented")


@dataclass
class Qwen2_5_VLConfig:
    vision: Qwen2_5_VLVisionConfig = field(default_factory=Qwen2_5_VLVisionConfig)
    text: Qwen2_5_VLTextConfig = field(default_factory=Qwen2_5_VLTextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: Optional[int] = 151643

    def validate(self) -> "Qwen2_5_VLConfig":
        self.vision.validate("vision")
        self.text.validate("text")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision.out_hidden_size={self.vision.out_hidden_size} must equal "
                             f"text.hidden_size={self.text.hidden_size} (image embeddings replace token embeddings)")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.text.vocab_size:
                raise ValueError(f"{name}={value!r} is outside the vocabulary [0, {self.text.vocab_size})")
        return self

    # --- serialisation (our model.json form) ---------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Qwen2_5_VLConfig":
        data = dict(data)
        vision = _build(Qwen2_5_VLVisionConfig, data.pop("vision", {}) or {}, "vision")
        text = _build(Qwen2_5_VLTextConfig, data.pop("text", {}) or {}, "text")
        return _build(cls, data, "", vision=vision, text=text).validate()

    @classmethod
    def preset(cls, name: str) -> "Qwen2_5_VLConfig":
        if name not in _PRESETS:
            raise ValueError(f"unknown Qwen2.5-VL preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls.from_dict(copy.deepcopy(_PRESETS[name]))


def _build(klass, data: dict, prefix: str, **extra):
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(f"unknown Qwen2.5-VL config field(s): {', '.join(where + k for k in unknown)}")
    return klass(**data, **extra)


def _release(hidden, inter, layers, heads, kv, vocab, tie, vision_inter):
    return {
        "vision": {"intermediate_size": vision_inter, "out_hidden_size": hidden},
        "text": {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
                 "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
                 "tie_word_embeddings": tie},
    }


# Released Qwen2.5-VL-*-Instruct config.json values. Shared by all sizes: vision depth 32, width 1280,
# 16 heads, window 112 px, full attention in blocks 7/15/23/31; LLM rope_theta 1e6, mrope [16, 24, 24],
# rms eps 1e-6, max positions 128000.
_PRESETS = {
    "3b": _release(2048, 11008, 36, 16, 2, 151936, True, 3420),
    "7b": _release(3584, 18944, 28, 28, 4, 152064, False, 3420),
    "32b": _release(5120, 27648, 64, 40, 8, 152064, False, 3456),
    "72b": _release(8192, 29568, 80, 64, 8, 152064, False, 3456),
    # the shared parity fixture (../shared/fixtures/qwen2_5_vl/forward)
    "tiny": {
        "vision": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                   "out_hidden_size": 64, "window_size": 56, "fullatt_block_indexes": [1]},
        "text": {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
                 "mrope_section": [2, 3, 3], "max_position_embeddings": 1024, "tie_word_embeddings": False},
        "image_token_id": 359, "video_token_id": 360, "vision_start_token_id": 356,
        "vision_end_token_id": 357, "vision_token_id": 358, "bos_token_id": 347, "eos_token_id": 349,
        "pad_token_id": 347,
    },
}


# ---------------------------------------------------------------------------- HF config.json
_HF_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act")
_HF_VISION_FIELDS = ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "in_channels",
                  "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size",
                  "fullatt_block_indexes", "tokens_per_second", "hidden_act")
_HF_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                 "vision_token_id", "bos_token_id", "eos_token_id", "pad_token_id")


def config_from_hf(hf: Dict[str, Any]) -> Qwen2_5_VLConfig:
    """Build the model config from an HF `config.json` dict (4.57.1 nested or original release flat)."""
    if not isinstance(hf, dict):
        raise TypeError(f"config_from_hf expects the parsed config.json dict, got {type(hf).__name__}")
    mt = hf.get("model_type")
    if mt not in (None, "qwen2_5_vl"):
        raise ValueError(f"config.json model_type is {mt!r}, expected 'qwen2_5_vl'")
    text_src = hf.get("text_config") or hf  # 4.57.1 nests the LLM, the release keeps it top level
    vis_src = dict(hf.get("vision_config") or {})
    if "in_chans" in vis_src and "in_channels" not in vis_src:  # original release spelling
        vis_src["in_channels"] = vis_src["in_chans"]
    missing = [f for f in ("vocab_size", "hidden_size", "num_hidden_layers") if f not in text_src]
    if missing:
        raise ValueError(f"config.json lacks LLM field(s) {missing} (looked in 'text_config' and the top level)")
    if not vis_src:
        raise ValueError("config.json has no 'vision_config'")

    text = {k: text_src[k] for k in _HF_TEXT_FIELDS if k in text_src}
    if "num_key_value_heads" not in text and "num_attention_heads" in text:
        text["num_key_value_heads"] = text["num_attention_heads"]
    rope = text_src.get("rope_scaling") or hf.get("rope_scaling") or {}
    if "mrope_section" in rope:
        text["mrope_section"] = list(rope["mrope_section"])
    tie = hf.get("tie_word_embeddings", text_src.get("tie_word_embeddings", False))
    text["tie_word_embeddings"] = bool(tie)
    vision = {k: vis_src[k] for k in _HF_VISION_FIELDS if k in vis_src}
    tokens = {k: hf.get(k, text_src.get(k)) for k in _HF_TOKEN_FIELDS if k in hf or k in text_src}
    for k, v in list(tokens.items()):
        if isinstance(v, list):  # eos may be a list in generation-style configs: the first is the one
            tokens[k] = v[0] if v else None
    return Qwen2_5_VLConfig(vision=Qwen2_5_VLVisionConfig(**vision), text=Qwen2_5_VLTextConfig(**text),
                            **tokens).validate()


# ------------------------------------------------------------------ MindSpeed-MM model.json and ours
# MindSpeed-MM model.json field -> Qwen2_5_VLConfig field
_VISION_FIELDS = {
    "num_layers": "depth", "hidden_size": "hidden_size", "num_attention_heads": "num_heads",
    "ffn_hidden_size": "intermediate_size", "in_channels": "in_channels", "patch_size": "patch_size",
    "temporal_patch_size": "temporal_patch_size", "spatial_merge_size": "spatial_merge_size",
    "window_attn_size": "window_size", "window_size": "window_size",
    "fullatt_block_indexes": "fullatt_block_indexes", "tokens_per_second": "tokens_per_second",
    "layernorm_epsilon": "rms_norm_eps", "activation_func": "hidden_act", "out_hidden_size": "out_hidden_size",
}
_TEXT_FIELDS = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_key_value_heads",
    "vocab_size": "vocab_size", "rope_theta": "rope_theta", "rotary_base": "rope_theta",
    "mrope_section": "mrope_section", "max_position_embeddings": "max_position_embeddings",
    "layernorm_epsilon": "rms_norm_eps", "norm_epsilon": "rms_norm_eps", "activation_func": "hidden_act",
}
_TOKEN_FIELDS = {
    "img_context_token_id": "image_token_id", "image_token_id": "image_token_id", "video_token_id": "video_token_id",
    "vision_start_token_id": "vision_start_token_id", "vision_end_token_id": "vision_end_token_id",
    "vision_token_id": "vision_token_id", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}


def config_from_mindspeed(d: Dict[str, Any]) -> Qwen2_5_VLConfig:
    """MindSpeed-MM's `model_*.json` (`image_encoder.vision_encoder` / `vision_projector`, `text_decoder`
    in Megatron names) -> config. Megatron fields with no meaning for the model are ignored."""
    for key in ("image_encoder", "text_decoder"):
        if not isinstance(d.get(key), dict):
            raise ValueError(f"model json: {key} (an object) is required for model_id {d.get('model_id')!r}")
    enc = d["image_encoder"]
    venc, proj, dec = enc.get("vision_encoder"), enc.get("vision_projector"), d["text_decoder"]
    if not isinstance(venc, dict) or not isinstance(proj, dict):
        raise ValueError("model json: image_encoder.vision_encoder and image_encoder.vision_projector are required")
    vision = {ours: venc[theirs] for theirs, ours in _VISION_FIELDS.items() if theirs in venc}
    # the merger's output width: the projector's hidden_size (MindSpeed-MM), else the LLM width
    if "hidden_size" in proj:
        vision["out_hidden_size"] = proj["hidden_size"]
    elif "out_hidden_size" in proj:
        vision["out_hidden_size"] = proj["out_hidden_size"]
    text = {ours: dec[theirs] for theirs, ours in _TEXT_FIELDS.items() if theirs in dec}
    if isinstance(dec.get("rope_scaling"), dict) and "mrope_section" in dec["rope_scaling"]:
        text["mrope_section"] = dec["rope_scaling"]["mrope_section"]
    if "untie_embeddings_and_output_weights" in dec:
        text["tie_word_embeddings"] = not dec["untie_embeddings_and_output_weights"]
    if "out_hidden_size" not in vision and "hidden_size" in text:
        vision["out_hidden_size"] = text["hidden_size"]
    top = {ours: d[theirs] for theirs, ours in _TOKEN_FIELDS.items() if theirs in d}
    for name, sub, counts_of in (("image_encoder.vision_encoder", venc, "num_layers"),
                                 ("text_decoder", dec, "num_layers")):
        pp = sub.get("pipeline_num_layers")
        if pp is not None and sub.get(counts_of) is not None and sum(pp) != sub[counts_of]:
            raise ValueError(f"model json: {name}.pipeline_num_layers {pp} sums to {sum(pp)}, "
                             f"but {name}.num_layers is {sub[counts_of]}")
    base = Qwen2_5_VLConfig.preset(d["preset"]).to_dict() if "preset" in d else {}
    return config_from_dict({**base, **top, "vision": {**base.get("vision", {}), **vision},
                             "text": {**base.get("text", {}), **text}})


def _known(klass, data: dict, where: str, dropped: list) -> dict:
    names = {f.name for f in dataclasses.fields(klass)}
    dropped.extend(f"{where}{k}" for k in data if k not in names)
    return {k: v for k, v in data.items() if k in names}


def config_from_dict(data: Dict[str, Any], dropped: Optional[list] = None) -> Qwen2_5_VLConfig:
    """Our form (`to_dict()`), optionally `{"preset": name, ...overrides}` (nested `vision` / `text`
    dicts merge into the preset's). Unknown keys are collected in `dropped` when it is given (and
    refused by `from_dict` when it is not)."""
    merged = copy.deepcopy(Qwen2_5_VLConfig.preset(data["preset"]).to_dict()) if "preset" in data else {}
    for key, value in data.items():
        if key in ("preset", "model_id"):
            continue
        if key in ("vision", "text") and isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    if dropped is None:
        return Qwen2_5_VLConfig.from_dict(merged)
    out = _known(Qwen2_5_VLConfig, merged, "", dropped)
    out["vision"] = _known(Qwen2_5_VLVisionConfig, merged.get("vision", {}) or {}, "vision.", dropped)
    out["text"] = _known(Qwen2_5_VLTextConfig, merged.get("text", {}) or {}, "text.", dropped)
    return Qwen2_5_VLConfig.from_dict(out)


def claims_json(d: Dict[str, Any]) -> bool:
    """A json (without model_id) in one of this family's forms."""
    if d.get("model_type") == "qwen2_5_vl" or "vision" in d or "text" in d:
        return True
    if "preset" in d:
        return d["preset"] in _PRESETS
    if isinstance(d.get("text_decoder"), dict):
        vision = (d.get("image_encoder") or {}).get("vision_encoder") or {}
        return vision.get("model_id", "qwen2vit") == "qwen2vit" and "num_moe_experts" not in d["text_decoder"]
    return False


def config_from_json(d: Dict[str, Any]) -> Qwen2_5_VLConfig:
    """Any json form this family reads (module doc); keys with no meaning here are listed on stderr."""
    if "vision_config" in d or d.get("model_type") == "qwen2_5_vl":
        return config_from_hf(d)
    if "text_decoder" in d or "image_encoder" in d:
        return config_from_mindspeed(d)
    dropped: list = []
    config = config_from_dict(d, dropped)
    if dropped:
        print(f"ms-mm: ignored Qwen2.5-VL model json key(s): {', '.join(sorted(dropped))}", file=sys.stderr)
    return config


def mindspeed_model_json(config: Qwen2_5_VLConfig, *, freeze: Optional[Dict[str, bool]] = None,
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

"""Qwen2.5-VL configuration: vision tower, Qwen2 text decoder and the special token ids.

Field names follow the upstream HF config (``vision_config`` / ``text_config``) so a reader can
compare them side by side; ``validate()`` names the first bad field and why. Presets carry the
released hyper-parameters of Qwen2.5-VL-3B/7B/32B/72B-Instruct plus the ``tiny`` shape of the
shared parity fixture.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional


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
            _positive_int(self, name, prefix)
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
            _positive_int(self, name, prefix)
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


def _positive_int(obj, name, prefix):
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{prefix}.{name}={value!r} must be a positive int")


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

"""BAGEL (Mixture-of-Transformers) configuration: Qwen2 MoT decoder, SigLIP NaViT tower, FLUX VAE.

Field names follow the release's files (`llm_config.json`, `vit_config.json`, the FLUX
`AutoEncoderParams` and upstream `BagelConfig`) so they can be compared side by side.
`validate()` names the first bad field and why. Presets: ``tiny`` (the shapes of the shared
parity fixture `fixtures/bagel/forward`) and ``7B-MoT`` (the released BAGEL-7B-MoT).

One convention is stored resolved rather than as on disk: `vit.num_hidden_layers` is the number
of ViT layers the model *uses*. The release's `vit_config.json` lists one more than used and
loaders compute ``num_hidden_layers + 1 + vit_select_layer`` (-2), which `config_from_hf` does once.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ms_mm.models import check_int

__all__ = ["Qwen2MoTConfig", "SiglipNaViTConfig", "AutoEncoderConfig", "BagelConfig", "config_from_hf",
           "FLUX_AE_PARAMS"]

# modeling/autoencoder.py:load_ae hard-codes these for the released FLUX.1 VAE
FLUX_AE_PARAMS: Dict[str, Any] = dict(resolution=256, in_channels=3, downsample=8, ch=128, out_ch=3,
                                      ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=16,
                                      scale_factor=0.3611, shift_factor=0.1159)

_ACTS = ("gelu_pytorch_tanh", "gelu")  # tanh-approximate GELU (upstream's choice) and exact erf GELU


def _positive_float(obj, name: str, prefix: str) -> None:
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{prefix}.{name}={v!r}: expected a positive number")


@dataclass
class Qwen2MoTConfig:
    """The Qwen2 decoder with a generation copy of every per-token weight (`layer_module` MoT)."""
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    layer_module: str = "Qwen2MoTDecoderLayer"
    # upstream's training flag: the understanding rows' stream carries no gradient (modeling.MoTDecoder)
    freeze_und: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, prefix: str = "llm") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            check_int(self, name, prefix)
        for name in ("rms_norm_eps", "rope_theta"):
            _positive_float(self, name, prefix)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
                             f"{prefix}.num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{prefix}.num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"{prefix}.num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{prefix}: head_dim={self.head_dim} must be even (rotate-half RoPE)")
        if self.hidden_act != "silu":
            raise ValueError(f"{prefix}.hidden_act={self.hidden_act!r}: only 'silu' is implemented")
        if self.layer_module != "Qwen2MoTDecoderLayer":
            raise ValueError(f"{prefix}.layer_module={self.layer_module!r}: only 'Qwen2MoTDecoderLayer' "
                             f"(BAGEL-MoT) is implemented")
        if self.tie_word_embeddings:
            raise ValueError(f"{prefix}.tie_word_embeddings=True: BAGEL-MoT keeps a separate lm_head (untied)")
        if not isinstance(self.freeze_und, bool):
            raise ValueError(f"{prefix}.freeze_und={self.freeze_und!r}: expected true or false")


@dataclass
class SiglipNaViTConfig:
    """SigLIP vision tower run on packed, variable-size images (NaViT). `num_hidden_layers` = used."""
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    rope: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size ** 2

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.num_patches_per_side ** 2

    def validate(self, prefix: str = "vit") -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size"):
            check_int(self, name, prefix)
        _positive_float(self, "layer_norm_eps", prefix)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{prefix}.hidden_size={self.hidden_size} is not divisible by "
                             f"{prefix}.num_attention_heads={self.num_attention_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"{prefix}.image_size={self.image_size} is smaller than "
                             f"{prefix}.patch_size={self.patch_size}")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"{prefix}.hidden_act={self.hidden_act!r}: expected one of {list(_ACTS)}")
        if self.rope:
            raise ValueError(f"{prefix}.rope=True (2-D rotary ViT) is not implemented; BAGEL-7B-MoT uses "
                             f"learned position embeddings (rope=False)")


@dataclass
class AutoEncoderConfig:
    """FLUX VAE (`modeling/autoencoder.py` AutoEncoderParams) + its GroupNorm convention."""
    resolution: int = 256
    in_channels: int = 3
    downsample: int = 8
    ch: int = 128
    out_ch: int = 3
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    num_groups: int = 32      # nn.GroupNorm(32, C, eps=1e-6) everywhere upstream
    norm_eps: float = 1e-6

    def validate(self, prefix: str = "vae") -> None:
        for name in ("resolution", "in_channels", "downsample", "ch", "out_ch", "z_channels", "num_groups"):
            check_int(self, name, prefix)
        check_int(self, "num_res_blocks", prefix, minimum=0)
        if not self.ch_mult or not all(isinstance(m, int) and m > 0 for m in self.ch_mult):
            raise ValueError(f"{prefix}.ch_mult={self.ch_mult!r}: expected a non-empty list of positive integers")
        if self.downsample != 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"{prefix}.downsample={self.downsample} does not match ch_mult={self.ch_mult} "
                             f"({len(self.ch_mult) - 1} downsampling levels = factor {2 ** (len(self.ch_mult) - 1)})")
        for m in set(self.ch_mult):
            if (self.ch * m) % self.num_groups:
                raise ValueError(f"{prefix}: channel count ch*ch_mult = {self.ch * m} is not divisible by "
                                 f"num_groups={self.num_groups} (GroupNorm)")
        if not isinstance(self.scale_factor, (int, float)) or self.scale_factor == 0:
            raise ValueError(f"{prefix}.scale_factor={self.scale_factor!r}: expected a non-zero number")
        _positive_float(self, "norm_eps", prefix)


@dataclass
class BagelConfig:
    llm: Qwen2MoTConfig = field(default_factory=Qwen2MoTConfig)
    vit: SiglipNaViTConfig = field(default_factory=SiglipNaViTConfig)
    vae: AutoEncoderConfig = field(default_factory=AutoEncoderConfig)
    visual_gen: bool = True
    visual_und: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0
    vit_select_layer: int = -2
    timestep_frequency_dim: int = 256   # TimestepEmbedder(frequency_embedding_size=256), [cos, sin]
    timestep_max_period: float = 10000.0
    # special token ids (Qwen2.5 tokenizer + add_special_tokens: <|im_start|>, <|im_end|>, vision start/end)
    bos_token_id: int = 151644
    eos_token_id: int = 151645
    start_of_image: int = 151652
    end_of_image: int = 151653
    # loss weights of the training loop (loss = ce_weight * ce + mse_weight * mse)
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    # the training loop's VAE latent: a posterior sample (upstream: DiagonalGaussian(sample=True)) or its mean
    vae_sample_posterior: bool = True

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size ** 2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        return self.vae.downsample * self.latent_patch_size

    def validate(self) -> "BagelConfig":
        self.llm.validate("llm")
        self.vit.validate("vit")
        self.vae.validate("vae")
        if not (self.visual_gen and self.visual_und):
            raise ValueError(f"visual_gen={self.visual_gen}, visual_und={self.visual_und}: only the unified "
                             f"model (both True, as BAGEL-7B-MoT) is implemented")
        for name in ("latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side", "timestep_frequency_dim"):
            check_int(self, name, "bagel")
        if self.timestep_frequency_dim % 2:
            raise ValueError(f"bagel.timestep_frequency_dim={self.timestep_frequency_dim} must be even")
        if self.llm.hidden_size % 4:
            raise ValueError(f"llm.hidden_size={self.llm.hidden_size} must be a multiple of 4 (the 2-D sin-cos "
                             f"position tables give half of it to each axis, as sin/cos pairs)")
        if self.vit_max_num_patch_per_side > self.vit.num_patches_per_side:
            raise ValueError(f"bagel.vit_max_num_patch_per_side={self.vit_max_num_patch_per_side} exceeds the ViT "
                             f"position table side vit.image_size // vit.patch_size = {self.vit.num_patches_per_side}")
        if self.connector_act not in _ACTS:
            raise ValueError(f"bagel.connector_act={self.connector_act!r}: expected one of {list(_ACTS)}")
        if not isinstance(self.interpolate_pos, bool):
            raise ValueError(f"bagel.interpolate_pos={self.interpolate_pos!r}: expected true or false")
        if not isinstance(self.vae_sample_posterior, bool):
            raise ValueError(f"bagel.vae_sample_posterior={self.vae_sample_posterior!r}: expected true or false")
        _positive_float(self, "timestep_shift", "bagel")
        _positive_float(self, "timestep_max_period", "bagel")
        if not isinstance(self.vit_select_layer, int) or self.vit_select_layer >= 0:
            raise ValueError(f"bagel.vit_select_layer={self.vit_select_layer!r}: expected a negative integer")
        for name in ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < self.llm.vocab_size:
                raise ValueError(f"bagel.{name}={v!r}: expected a token id in [0, llm.vocab_size={self.llm.vocab_size})")
        return self

    # ------------------------------------------------------------------ our own json form
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "BagelConfig":
        d = copy.deepcopy(dict(d))
        subs = {"llm": Qwen2MoTConfig, "vit": SiglipNaViTConfig, "vae": AutoEncoderConfig}
        kwargs = {}
        for key, klass in subs.items():
            sub = d.pop(key, {}) or {}
            kwargs[key] = _build(klass, sub, key)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"bagel config: unknown field(s) {unknown}")
        return cls(**kwargs, **d).validate()

    @classmethod
    def preset(cls, name: str) -> "BagelConfig":
        if name == "tiny":
            return cls(
                llm=Qwen2MoTConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-6,
                                   rope_theta=10000.0, max_position_embeddings=512),
                vit=SiglipNaViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=112, patch_size=14),
                vae=AutoEncoderConfig(resolution=64, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=0, z_channels=4),
                latent_patch_size=2, max_latent_size=8, vit_max_num_patch_per_side=8,
                bos_token_id=348, eos_token_id=349, start_of_image=356, end_of_image=357,
            ).validate()
        if name in ("7B-MoT", "7b-mot", "BAGEL-7B-MoT"):
            return cls().validate()
        raise ValueError(f"unknown BAGEL preset {name!r}; known: 'tiny', '7B-MoT'")


def _build(klass, src: Dict[str, Any], prefix: str):
    known = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(src) - known)
    if unknown:
        raise ValueError(f"{prefix}: unknown field(s) {unknown}")
    return klass(**src)


# ---------------------------------------------------------------------------------- release files
_LLM_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act",
               "qk_norm", "tie_word_embeddings", "layer_module", "freeze_und")
_VIT_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels", "image_size",
               "patch_size", "hidden_act", "layer_norm_eps", "rope")
_AE_FIELDS = tuple(FLUX_AE_PARAMS)
_BAGEL_FIELDS = ("visual_gen", "visual_und", "latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side",
                 "connector_act", "interpolate_pos", "timestep_shift", "vit_select_layer")
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image")


def _ae_params(ae: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """AutoEncoderParams from an ae config dict: the fields at the top level, or nested under a key
    naming the autoencoder params (the fixture's `tiny_autoencoder_params (...)`); absent: FLUX defaults."""
    if not ae:
        return dict(FLUX_AE_PARAMS)
    if "z_channels" in ae:
        return {k: ae[k] for k in _AE_FIELDS if k in ae}
    nested = [v for k, v in ae.items() if isinstance(v, dict) and "z_channels" in v
              and "autoencoder_params" in k.lower().replace(" ", "_")]
    if len(nested) != 1:
        raise ValueError("ae config: expected the AutoEncoderParams fields (z_channels, ch, ch_mult, ...) at the "
                         f"top level or under one '*autoencoder_params*' key; got keys {sorted(ae)}")
    return {k: nested[0][k] for k in _AE_FIELDS if k in nested[0]}


def config_from_hf(hf: Dict[str, Any]) -> BagelConfig:
    """The model config from the release's config dicts:

    ``{"llm_config": llm_config.json, "vit_config": vit_config.json, "ae_config": ae params (optional;
    FLUX defaults as `load_ae`), "bagel_config": BagelConfig / data settings (optional; the
    release's inference defaults)}``. The ViT depth becomes ``num_hidden_layers + 1 + vit_select_layer``.
    """
    if not isinstance(hf, dict):
        raise TypeError(f"config_from_hf expects a dict of the release's config files, got {type(hf).__name__}")
    for key in ("llm_config", "vit_config"):
        if not isinstance(hf.get(key), dict):
            raise ValueError(f"config_from_hf: missing {key!r} (the content of {key}.json)")
    llm_src, vit_src = hf["llm_config"], hf["vit_config"]
    bagel_src = dict(hf.get("bagel_config") or {})
    if llm_src.get("model_type") not in (None, "qwen2"):
        raise ValueError(f"llm_config.json model_type is {llm_src.get('model_type')!r}, expected 'qwen2'")
    if vit_src.get("model_type") not in (None, "siglip_vision_model"):
        raise ValueError(f"vit_config.json model_type is {vit_src.get('model_type')!r}, expected 'siglip_vision_model'")
    llm = {k: llm_src[k] for k in _LLM_FIELDS if k in llm_src and llm_src[k] is not None}
    llm.setdefault("num_key_value_heads", llm.get("num_attention_heads"))
    # the release's llm_config.json predates these fields: app.py / the trainer set them (qk_norm, MoT)
    llm.setdefault("qk_norm", True)
    llm.setdefault("layer_module", "Qwen2MoTDecoderLayer")
    vit = {k: vit_src[k] for k in _VIT_FIELDS if k in vit_src and vit_src[k] is not None}
    if "vit_rope" in bagel_src:  # the trainer overrides vit_config.rope with its vit_rope argument
        vit["rope"] = bool(bagel_src["vit_rope"])
    select = int(bagel_src.get("vit_select_layer", -2))
    if "num_hidden_layers" not in vit_src:
        raise ValueError("vit_config.json lacks num_hidden_layers")
    vit["num_hidden_layers"] = int(vit_src["num_hidden_layers"]) + 1 + select
    bagel = {k: bagel_src[k] for k in _BAGEL_FIELDS if k in bagel_src}
    tokens = bagel_src.get("special_token_ids") or {}
    bagel.update({k: int(tokens[k]) for k in _TOKEN_FIELDS if k in tokens})
    train = bagel_src.get("train") or {}
    for k in ("ce_weight", "mse_weight"):
        if k in train:
            bagel[k] = float(train[k])
    return BagelConfig(llm=Qwen2MoTConfig(**llm), vit=SiglipNaViTConfig(**vit),
                       vae=AutoEncoderConfig(**_ae_params(hf.get("ae_config"))), **bagel).validate()


# ------------------------------------------------------------------------- MindSpeed-MM model.json
# SigLIP towers by MindSpeed-MM `vision_encoder.model_name` (sizes of the released checkpoint)
_SIGLIP_TOWERS = {"siglip_so400m_patch14_384": dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                                                   patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")}


def claims_mindspeed(d: Dict[str, Any]) -> bool:
    return isinstance(d.get("mllm"), dict) and isinstance(d.get("ae"), dict)


def config_from_mindspeed(mj: Dict[str, Any]) -> BagelConfig:
    """A MindSpeed-MM BAGEL `model.json` (`mllm` Qwen2-MoT config, `image_encoder.vision_encoder` /
    `vision_projector`, `ae`, `visual_und`, `visual_gen`) -> `BagelConfig`. `vision_encoder.layers` is the
    number of ViT layers used (the release's 27 + 1 + select_layer -2 = 26). The tower's widths come from
    `model_name` unless given (`hidden_size`, `intermediate_size`, `num_attention_heads`, `patch_size`);
    `ae` may carry the AutoEncoderParams (`ch`, `ch_mult`, `num_res_blocks`, ...; else FLUX's)."""
    for key in ("mllm", "image_encoder", "ae"):
        if not isinstance(mj.get(key), dict):
            raise ValueError(f"model json: {key} (an object) is required for model_id bagel")
    m, ie, ae = mj["mllm"], mj["image_encoder"], mj["ae"]
    ve = ie.get("vision_encoder") or {}
    llm = {k: m[k] for k in _LLM_FIELDS if k in m and m[k] is not None}
    llm.setdefault("num_key_value_heads", llm.get("num_attention_heads"))
    tower = dict(_SIGLIP_TOWERS.get(ve.get("model_name", "siglip_so400m_patch14_384"), {}))
    if not tower and "hidden_size" not in ve:
        raise ValueError(f"model json: image_encoder.vision_encoder.model_name {ve.get('model_name')!r} is unknown "
                         f"(known: {sorted(_SIGLIP_TOWERS)}); give hidden_size / intermediate_size / "
                         f"num_attention_heads / patch_size")
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "patch_size", "layer_norm_eps", "hidden_act"):
        if k in ve:
            tower[k] = ve[k]
    if "layers" not in ve:
        raise ValueError("model json: image_encoder.vision_encoder.layers (ViT layers used) is required")
    vit = dict(tower, num_hidden_layers=int(ve["layers"]), image_size=int(ve.get("image_size", 980)))
    select = int(ve.get("select_layer", -2))
    ae_params = dict(FLUX_AE_PARAMS)
    ae_params.update({k: ae[k] for k in _AE_FIELDS if k in ae})
    bagel = dict(visual_gen=bool(mj.get("visual_gen", True)), visual_und=bool(mj.get("visual_und", True)),
                 vit_select_layer=select)
    for src, dst in (("max_latent_size", "max_latent_size"), ("latent_patch_size", "latent_patch_size"),
                     ("timestep_shift", "timestep_shift")):
        if src in ae:
            bagel[dst] = ae[src]
    if "vit_max_num_patch_per_side" in ie:
        bagel["vit_max_num_patch_per_side"] = int(ie["vit_max_num_patch_per_side"])
    tokens = mj.get("special_token_ids") or {}
    bagel.update({k: int(tokens[k]) for k in _TOKEN_FIELDS if k in tokens})
    for k in ("ce_weight", "mse_weight", "connector_act", "interpolate_pos", "vae_sample_posterior"):
        if k in mj:
            bagel[k] = mj[k]
    try:
        return BagelConfig(llm=Qwen2MoTConfig(**llm), vit=SiglipNaViTConfig(**vit), vae=AutoEncoderConfig(**ae_params),
                           **bagel).validate()
    except TypeError as e:
        raise ValueError(f"model json: {e}") from None


def mindspeed_model_json(config: BagelConfig, freeze: Optional[Dict[str, bool]] = None,
                         from_pretrained: str = "") -> Dict[str, Any]:
    """The MindSpeed-MM `model.json` of `config` (the reader's inverse)."""
    freeze = freeze or {}
    llm = {k: getattr(config.llm, k) for k in _LLM_FIELDS}
    llm.update(model_id="qwen2MoT", model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_moe=True,
               is_causal=True)
    v = config.vit
    return {
        "model_id": "bagel",
        "mllm": llm,
        "image_encoder": {
            "vit_max_num_patch_per_side": config.vit_max_num_patch_per_side,
            "vision_encoder": {"model_id": "SigLip", "model_name": "custom", "layers": v.num_hidden_layers,
                               "image_size": v.image_size, "select_layer": config.vit_select_layer,
                               "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                               "num_attention_heads": v.num_attention_heads, "patch_size": v.patch_size,
                               "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act, "embed_layer": "linear",
                               "freeze": bool(freeze.get("vision_encoder", False))},
            "vision_projector": {"model_id": "InternVLMLP", "vit_hidden_size": v.hidden_size,
                                 "llm_hidden_size": config.llm.hidden_size,
                                 "freeze": bool(freeze.get("vision_projector", False))},
        },
        "ae": {"model_id": "flux_vae", "from_pretrained": from_pretrained, "freeze": True,
               **{k: getattr(config.vae, k) for k in _AE_FIELDS},
               "max_latent_size": config.max_latent_size, "latent_patch_size": config.latent_patch_size,
               "timestep_shift": config.timestep_shift},
        "special_token_ids": {k: getattr(config, k) for k in _TOKEN_FIELDS},
        "visual_und": config.visual_und, "visual_gen": config.visual_gen,
        "interpolate_pos": config.interpolate_pos,
    }

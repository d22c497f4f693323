"""MoVQGAN image tokenizer config (the ``ddconfig`` + quantizer settings of ai-forever's MOVQ), its
presets, the reader of a release's ``movqgan_config.json``, and the full parameter table (names
and shapes) the model has for a config. Pure Python: the converter reads it without MindSpore.

Upstream conventions kept as fixed facts (not config): GroupNorm with 32 groups and eps 1e-6, swish,
Downsample = pad (0,1,0,1) + 3x3 stride-2 conv, Upsample = nearest x2 + 3x3 conv, single-head
attention blocks with scale C^-0.5, decoder norms = SpatialNorm conditioned on z_q (add_conv False).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Tuple

from ms_mm.models import check_int

__all__ = ["MoVQGANConfig", "GROUP_NORM_GROUPS", "GROUP_NORM_EPS", "movqgan_parameter_shapes",
           "movqgan_config_from_release", "config_from_hf", "read_hf_config", "CONFIG_FILE"]

CONFIG_FILE = "movqgan_config.json"   # beside the weights in a MoVQGAN checkpoint directory

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6


@dataclass
class MoVQGANConfig:
    """Field names follow upstream's ``ddconfig`` plus ``n_embed`` / ``embed_dim`` / ``beta`` / ``legacy``."""
    ch: int = 256
    ch_mult: Tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (32,)
    resolution: int = 256        # only used to place attention blocks (counted from here, halved per level)
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    double_z: bool = False
    dropout: float = 0.0
    n_embed: int = 16384
    embed_dim: int = 4
    beta: float = 0.25
    legacy: bool = True          # upstream's (buggy-by-design) beta placement, the default everywhere

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)

    # ---------------------------------------------------------------- derived
    @property
    def num_resolutions(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_resolutions - 1)

    def level_resolution(self, level: int) -> int:
        return self.resolution // 2 ** level

    # ---------------------------------------------------------------- checks
    def validate(self) -> "MoVQGANConfig":
        def bad(name, why):
            raise ValueError(f"MoVQGANConfig.{name}: {why}")

        for name in ("ch", "num_res_blocks", "resolution", "in_channels", "out_ch", "z_channels", "n_embed",
                     "embed_dim"):
            check_int(self, name, "MoVQGANConfig")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            bad("ch_mult", f"must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
        if self.ch % GROUP_NORM_GROUPS:
            bad("ch", f"{self.ch} channels are not divisible by the {GROUP_NORM_GROUPS} GroupNorm groups")
        for m in self.ch_mult:
            if (self.ch * m) % GROUP_NORM_GROUPS:
                bad("ch_mult", f"ch * {m} = {self.ch * m} channels are not divisible by the "
                               f"{GROUP_NORM_GROUPS} GroupNorm groups")
        if self.resolution % self.downsample_factor:
            bad("resolution", f"{self.resolution} is not divisible by the downsample factor {self.downsample_factor}")
        if self.double_z:
            bad("double_z", "must be False: MOVQ's quant_conv takes z_channels inputs")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.beta < 0:
            bad("beta", f"must be >= 0, got {self.beta!r}")
        return self

    # ---------------------------------------------------------------- forms
    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MoVQGANConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MoVQGANConfig.from_dict: unknown field(s) {unknown}")
        return cls(**d).validate()

    @classmethod
    def preset(cls, name: str) -> "MoVQGANConfig":
        if name not in _PRESETS:
            raise ValueError(f"MoVQGANConfig.preset: unknown preset {name!r}; known: {sorted(_PRESETS)}")
        return cls(**_PRESETS[name]).validate()


_PRESETS: Dict[str, Dict[str, Any]] = {
    # ../shared/fixtures/lumina_mgpt2/movqgan
    "tiny": dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(8,), resolution=64,
                 n_embed=64, embed_dim=4),
    # ai-forever/MoVQGAN releases (lumina_mgpt/movqgan/__init__.py MODELS); Lumina-mGPT 2.0 uses 270M
    "67M": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,), resolution=256),
    "102M": dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=4, attn_resolutions=(32,), resolution=256),
    "270M": dict(ch=256, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(32,), resolution=256),
}

_DD_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "in_channels", "out_ch",
              "z_channels", "double_z", "dropout")


def movqgan_config_from_release(d: Dict[str, Any]) -> MoVQGANConfig:
    """``movqgan_config.json`` ({"ddconfig": {...}, "n_embed", "embed_dim", "beta"?, "legacy"?,
    "remap"?}; extra keys such as a recorded reference config are ignored) -> MoVQGANConfig."""
    if not isinstance(d, dict) or not isinstance(d.get("ddconfig"), dict):
        raise ValueError("movqgan config: expected a dict with a 'ddconfig' dict")
    dd = d["ddconfig"]
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "z_channels") if k not in dd]
    if missing:
        raise ValueError(f"movqgan config: ddconfig lacks {missing}")
    if d.get("remap") is not None:
        raise ValueError("movqgan config: remap is not supported (the released tokenizers have none)")
    kw = {k: dd[k] for k in _DD_FIELDS if k in dd}
    for k in ("n_embed", "embed_dim", "beta", "legacy"):
        if k in d:
            kw[k] = d[k]
    return MoVQGANConfig(**kw).validate()


def config_from_hf(hf: Dict[str, Any]) -> MoVQGANConfig:
    """The converter's reader (`FamilySpec.config_from_hf`): the release config dict -> MoVQGANConfig."""
    return movqgan_config_from_release(hf)


def read_hf_config(hf_dir) -> Dict[str, Any]:
    """``<hf_dir>/movqgan_config.json`` as a dict (`FamilySpec.read_hf_config`); errors name the file."""
    from convert.framework import ConversionError  # imported late: this module stays pure Python

    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{path} not found (a MoVQGAN checkpoint directory needs its {CONFIG_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


# ---------------------------------------------------------------------------- parameter table

def _conv(out: "OrderedDict", name: str, cin: int, cout: int, k: int):
    out[name + ".weight"] = (cout, cin, k, k)
    out[name + ".bias"] = (cout,)


def _norm(out, name: str, c: int, zq: int = 0):
    if zq:  # SpatialNorm
        out[name + ".norm_layer.weight"] = (c,)
        out[name + ".norm_layer.bias"] = (c,)
        _conv(out, name + ".conv_y", zq, c, 1)
        _conv(out, name + ".conv_b", zq, c, 1)
    else:
        out[name + ".weight"] = (c,)
        out[name + ".bias"] = (c,)


def _resblock(out, name, cin, cout, zq=0):
    _norm(out, name + ".norm1", cin, zq)
    _conv(out, name + ".conv1", cin, cout, 3)
    _norm(out, name + ".norm2", cout, zq)
    _conv(out, name + ".conv2", cout, cout, 3)
    if cin != cout:
        _conv(out, name + ".nin_shortcut", cin, cout, 1)


def _attn(out, name, c, zq=0):
    _norm(out, name + ".norm", c, zq)
    for p in ("q", "k", "v", "proj_out"):
        _conv(out, f"{name}.{p}", c, c, 1)


def encoder_channels(c: MoVQGANConfig) -> List[Tuple[int, int]]:
    """(block_in, block_out) of each encoder level's first block."""
    mult = (1,) + c.ch_mult
    return [(c.ch * mult[i], c.ch * c.ch_mult[i]) for i in range(c.num_resolutions)]


def decoder_channels(c: MoVQGANConfig) -> List[Tuple[int, int]]:
    """(block_in, block_out) of each decoder level's first block (levels run top-down in the forward)."""
    n = c.num_resolutions
    return [(c.ch * c.ch_mult[min(i + 1, n - 1)], c.ch * c.ch_mult[i]) for i in range(n)]


def movqgan_parameter_shapes(c: MoVQGANConfig) -> "OrderedDict[str, Tuple[int, ...]]":
    """Every parameter of `MoVQGAN(c)` with its shape, under the checkpoint's names (MOVQ.state_dict())."""
    out: "OrderedDict[str, Tuple[int, ...]]" = OrderedDict()
    n, zq = c.num_resolutions, c.embed_dim
    # encoder
    _conv(out, "encoder.conv_in", c.in_channels, c.ch, 3)
    for i, (cin, cout) in enumerate(encoder_channels(c)):
        for j in range(c.num_res_blocks):
            _resblock(out, f"encoder.down.{i}.block.{j}", cin if j == 0 else cout, cout)
            if c.level_resolution(i) in c.attn_resolutions:
                _attn(out, f"encoder.down.{i}.attn.{j}", cout)
        if i != n - 1:
            _conv(out, f"encoder.down.{i}.downsample.conv", cout, cout, 3)
    top = c.ch * c.ch_mult[-1]
    _resblock(out, "encoder.mid.block_1", top, top)
    _attn(out, "encoder.mid.attn_1", top)
    _resblock(out, "encoder.mid.block_2", top, top)
    _norm(out, "encoder.norm_out", top)
    _conv(out, "encoder.conv_out", top, c.z_channels, 3)
    # quantizer and the 1x1 convs around it
    out["quantize.embedding.weight"] = (c.n_embed, c.embed_dim)
    _conv(out, "quant_conv", c.z_channels, c.embed_dim, 1)
    _conv(out, "post_quant_conv", c.embed_dim, c.z_channels, 1)
    # decoder
    _conv(out, "decoder.conv_in", c.z_channels, top, 3)
    _resblock(out, "decoder.mid.block_1", top, top, zq)
    _attn(out, "decoder.mid.attn_1", top, zq)
    _resblock(out, "decoder.mid.block_2", top, top, zq)
    for i, (cin, cout) in enumerate(decoder_channels(c)):
        for j in range(c.num_res_blocks + 1):
            _resblock(out, f"decoder.up.{i}.block.{j}", cin if j == 0 else cout, cout, zq)
            if c.level_resolution(i) in c.attn_resolutions:
                _attn(out, f"decoder.up.{i}.attn.{j}", cout, zq)
        if i != 0:
            _conv(out, f"decoder.up.{i}.upsample.conv", cout, cout, 3)
    _norm(out, "decoder.norm_out", c.ch * c.ch_mult[0], zq)
    _conv(out, "decoder.conv_out", c.ch * c.ch_mult[0], c.out_ch, 3)
    return out

"""MoVQGAN (ai-forever's MOVQ, as vendored by Lumina-mGPT 2.0): the image tokenizer.

    image [B,3,H,W] --Encoder--> h --quant_conv--> z [B,e,H/f,W/f] --VectorQuantizer--> codes, z_q
    z_q --post_quant_conv--> --MOVQDecoder (every norm a SpatialNorm conditioned on z_q)--> image

`MoVQGAN.construct(image)` is the autoencoder forward: ``(decoded, emb_loss, codes, z_q, z)`` with
``codes [B, H/f * W/f]`` int32 (row-major h, w) and ``z`` = quant_conv(encoder(image)) (pre-quant).
`encode`, `decode` and `decode_code` are upstream's three entry points. Parameter names are the
checkpoint's (`MOVQ.state_dict()`), listed by `movqgan_config.movqgan_parameter_shapes`.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from ms_mm.ops import CoreAttention, Embedding
from ms_mm.ops.functional import permute
from ms_mm.ops import Conv2d, GroupNorm, resize_nearest, upsample_nearest
from ms_mm.models.lumina_mgpt2.movqgan_config import (
    GROUP_NORM_EPS, GROUP_NORM_GROUPS, MoVQGANConfig, decoder_channels, encoder_channels,
)

__all__ = ["MoVQGAN", "MoVQEncoder", "MoVQDecoder", "VectorQuantizer", "SpatialNorm", "MoVQGANTokenizer",
           "MoVQGANDetokenizer"]


def _group_norm(c):
    return GroupNorm(GROUP_NORM_GROUPS, c, eps=GROUP_NORM_EPS)


class SpatialNorm(nn.Cell):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq nearest-resized to f's size (MoVQ's conditioning)."""

    def __init__(self, channels, zq_channels):
        super().__init__()
        self.norm_layer = _group_norm(channels)
        self.conv_y = Conv2d(zq_channels, channels, 1)
        self.conv_b = Conv2d(zq_channels, channels, 1)

    def construct(self, f, zq):
        zq = resize_nearest(zq, f.shape[-2:])
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


def _make_norm(channels, zq_channels):
    return SpatialNorm(channels, zq_channels) if zq_channels else _group_norm(channels)


class ResnetBlock(nn.Cell):
    def __init__(self, in_channels, out_channels, dropout=0.0, zq_channels=0):
        super().__init__()
        self.spatial = bool(zq_channels)
        self.norm1 = _make_norm(in_channels, zq_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _make_norm(out_channels, zq_channels)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = in_channels != out_channels
        if self.shortcut:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def _norm(self, norm, x, zq):
        return norm(x, zq) if self.spatial else norm(x)

    def construct(self, x, zq=None):
        h = self.conv1(ops.silu(self._norm(self.norm1, x, zq)))
        h = ops.silu(self._norm(self.norm2, h, zq))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        if self.shortcut:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Cell):
    """Single-head self-attention over the H*W positions (1x1 conv projections, scale C^-0.5)."""

    def __init__(self, channels, zq_channels=0):
        super().__init__()
        self.spatial = bool(zq_channels)
        self.norm = _make_norm(channels, zq_channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)
        self.core_attention = CoreAttention(1, head_dim=channels)

    @staticmethod
    def _tokens(t):
        """[B, C, H, W] -> [B, 1, H*W, C] (one head)."""
        b, c, hh, ww = t.shape
        return permute(t.reshape(b, c, hh * ww), (0, 2, 1)).reshape(b, 1, hh * ww, c)

    def construct(self, x, zq=None):
        h = self.norm(x, zq) if self.spatial else self.norm(x)
        b, c, hh, ww = h.shape
        out = self.core_attention(self._tokens(self.q(h)), self._tokens(self.k(h)), self._tokens(self.v(h)))
        out = permute(out.reshape(b, hh * ww, c), (0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Cell):
    """Asymmetric zero pad (right, bottom) then a 3x3 stride-2 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def construct(self, x):
        return self.conv(ops.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Cell):
    def __init__(self, channels):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def construct(self, x):
        return self.conv(upsample_nearest(x, 2, 2))


class _Level(nn.Cell):
    """One resolution level: ``block`` (and ``attn``, one after each block where present), then the
    resampler (``downsample`` / ``upsample``) unless it is the last level of the pass."""

    def __init__(self, blocks, attns, resample_name=None, resample=None):
        super().__init__()
        self.block = nn.CellList(blocks)
        self.attn = nn.CellList(attns)
        self.has_attn = len(attns) > 0
        self.resample_name = resample_name
        if resample_name == "downsample":
            self.downsample = resample
        elif resample_name == "upsample":
            self.upsample = resample

    def construct(self, h, zq=None):
        for j in range(len(self.block)):
            h = self.block[j](h, zq)
            if self.has_attn:
                h = self.attn[j](h, zq)
        if self.resample_name == "downsample":
            h = self.downsample(h)
        elif self.resample_name == "upsample":
            h = self.upsample(h)
        return h


class _Mid(nn.Cell):
    def __init__(self, channels, dropout, zq_channels=0):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, zq_channels)
        self.attn_1 = AttnBlock(channels, zq_channels)
        self.block_2 = ResnetBlock(channels, channels, dropout, zq_channels)

    def construct(self, h, zq=None):
        return self.block_2(self.attn_1(self.block_1(h, zq), zq), zq)


class MoVQEncoder(nn.Cell):
    def __init__(self, c: MoVQGANConfig):
        super().__init__()
        n = c.num_resolutions
        self.conv_in = Conv2d(c.in_channels, c.ch, 3, padding=1)
        levels = []
        for i, (cin, cout) in enumerate(encoder_channels(c)):
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, c.dropout) for j in range(c.num_res_blocks)]
            attns = [AttnBlock(cout) for _ in range(c.num_res_blocks)] \
                if c.level_resolution(i) in c.attn_resolutions else []
            levels.append(_Level(blocks, attns, *(("downsample", Downsample(cout)) if i != n - 1 else ())))
        self.down = nn.CellList(levels)
        top = c.ch * c.ch_mult[-1]
        self.mid = _Mid(top, c.dropout)
        self.norm_out = _group_norm(top)
        self.conv_out = Conv2d(top, c.z_channels, 3, padding=1)

    def construct(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(ops.silu(self.norm_out(h)))


class MoVQDecoder(nn.Cell):
    """Decoder conditioned on z_q: ``construct(z, zq)`` with z = post_quant_conv(z_q)."""

    def __init__(self, c: MoVQGANConfig):
        super().__init__()
        zq = c.embed_dim
        top = c.ch * c.ch_mult[-1]
        self.conv_in = Conv2d(c.z_channels, top, 3, padding=1)
        self.mid = _Mid(top, c.dropout, zq)
        levels = []
        for i, (cin, cout) in enumerate(decoder_channels(c)):
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, c.dropout, zq) for j in range(c.num_res_blocks + 1)]
            attns = [AttnBlock(cout, zq) for _ in range(c.num_res_blocks + 1)] \
                if c.level_resolution(i) in c.attn_resolutions else []
            levels.append(_Level(blocks, attns, *(("upsample", Upsample(cout)) if i != 0 else ())))
        self.up = nn.CellList(levels)  # indexed by level; the forward runs them top-down
        self.num_levels = len(levels)
        self.norm_out = SpatialNorm(c.ch * c.ch_mult[0], zq)
        self.conv_out = Conv2d(c.ch * c.ch_mult[0], c.out_ch, 3, padding=1)

    def construct(self, z, zq):
        h = self.mid(self.conv_in(z), zq)
        for i in range(self.num_levels - 1, -1, -1):
            h = self.up[i](h, zq)
        return self.conv_out(ops.silu(self.norm_out(h, zq)))


class VectorQuantizer(nn.Cell):
    """Nearest codebook entry by |z|^2 + |e|^2 - 2 z.e (argmin, first index on ties), the VQ loss
    (legacy: mean((sg(zq)-z)^2) + beta * mean((zq-sg(z))^2)) and the straight-through z_q."""

    def __init__(self, n_embed, embed_dim, beta=0.25, legacy=True):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = float(beta)
        self.legacy = legacy
        self.embedding = Embedding(n_embed, embed_dim, weight_init=1.0 / n_embed)
        self.matmul = ops.MatMul(transpose_b=True)
        self.argmin = ops.Argmin(axis=1, output_type=ms.int32)

    def construct(self, z):
        b, e, h, w = z.shape
        z_bhwc = permute(z, (0, 2, 3, 1))
        flat = z_bhwc.reshape(-1, e)
        table = self.embedding.weight
        dist = (flat * flat).sum(1, keepdims=True) + (table * table).sum(1) - 2 * self.matmul(flat, table)
        codes = self.argmin(dist)
        z_q = self.embedding(codes).reshape(z_bhwc.shape)
        commit = ops.mean((ops.stop_gradient(z_q) - z_bhwc) ** 2)
        codebook = ops.mean((z_q - ops.stop_gradient(z_bhwc)) ** 2)
        loss = commit + self.beta * codebook if self.legacy else self.beta * commit + codebook
        z_q = z_bhwc + ops.stop_gradient(z_q - z_bhwc)
        return permute(z_q, (0, 3, 1, 2)), loss, codes.reshape(b, h * w)

    def lookup(self, codes, h, w):
        """codes [B, h*w] (or [B, h, w]) -> z_q [B, e, h, w]."""
        b = codes.shape[0]
        z_q = self.embedding(codes.reshape(b, h * w)).reshape(b, h, w, self.embed_dim)
        return permute(z_q, (0, 3, 1, 2))


class MoVQGAN(nn.Cell):
    def __init__(self, config: MoVQGANConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = MoVQEncoder(config)
        self.decoder = MoVQDecoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta, config.legacy)
        self.quant_conv = Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, image):
        """image [B, 3, H, W] in [-1, 1] -> (z_q [B,e,h,w], emb_loss [], codes [B, h*w] int32, z pre-quant)."""
        z = self.quant_conv(self.encoder(image))
        z_q, loss, codes = self.quantize(z)
        return z_q, loss, codes, z

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q), z_q)

    def decode_code(self, codes, h, w):
        """codes [B, h*w] -> image [B, 3, h*f, w*f] (Lumina's path from generated tokens to pixels)."""
        return self.decode(self.quantize.lookup(codes, h, w))

    def construct(self, image):
        z_q, loss, codes, z = self.encode(image)
        return self.decode(z_q), loss, codes, z_q, z


class MoVQGANTokenizer(nn.Cell):
    """image [B, 3, H, W] -> codes [B, H/f * W/f] (feature extraction's graph: encode, codes only)."""

    def __init__(self, movqgan: MoVQGAN):
        super().__init__()
        self.movqgan = movqgan

    def construct(self, image):
        return self.movqgan.encode(image)[2]


class MoVQGANDetokenizer(nn.Cell):
    """codes [B, h*w] -> image [B, 3, h*f, w*f] (the sampler's decode graph)."""

    def __init__(self, movqgan: MoVQGAN, h: int, w: int):
        super().__init__()
        self.movqgan = movqgan
        self.h, self.w = h, w

    def construct(self, codes):
        return self.movqgan.decode_code(codes, self.h, self.w)

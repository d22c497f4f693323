"""ms_mm.ops: the thin op layer every model builds on.

Owns the single kernel switch (``kernels()``: Ascend fused kernels vs portable math), the
parameter-holding building blocks (Linear, RMSNorm, LayerNorm, Embedding, CoreAttention, GatedMLP, each
keeping its primitives as attributes so parallel plans can shard them) and the stateless
helpers (rotary, GELU variants, SiLU). Models import from here and never check the device.
"""
from ms_mm.ops.attention import CoreAttention
from ms_mm.ops.conv import Conv2d, GroupNorm, resize_nearest, upsample_nearest
from ms_mm.ops.functional import (apply_rotary, broadcast_pair, cross_entropy_sum, gelu, logsumexp,
                                  permute, rotate_half, silu, swiglu)
from ms_mm.ops.switch import kernels, sharded, use_fused
from ms_mm.ops.layers import Embedding, GatedMLP, LayerNorm, Linear, RMSNorm

__all__ = [
    "kernels", "use_fused", "sharded",
    "Linear", "RMSNorm", "LayerNorm", "Embedding", "CoreAttention", "GatedMLP",
    "rotate_half", "apply_rotary", "broadcast_pair", "permute", "gelu", "silu", "swiglu", "logsumexp", "cross_entropy_sum",
    "Conv2d", "GroupNorm", "upsample_nearest", "resize_nearest",
]

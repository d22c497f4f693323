"""Image-side Cells: Conv2d, GroupNorm and integer-factor nearest resizing (the VAE of BAGEL and
MoVQGAN of Lumina-mGPT use them). Same conventions as `layers.py`: primitives held as attributes so a
parallel plan can `.shard()` them, parameters keep their dtype, compute follows the input, statistics
in fp32. One implementation on every device (MindSpore's own kernels).
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, One, Uniform, Zero, initializer

from ms_mm.ops.functional import add, mul, sub

__all__ = ["Conv2d", "GroupNorm", "resize_nearest", "upsample_nearest"]


class Conv2d(nn.Cell):
    """2-D convolution on NCHW input with ``weight [out, in, k, k]`` and ``bias [out]`` (torch layout,
    so checkpoints map one to one). ``padding`` is symmetric zero padding."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, has_bias=True,
                 param_dtype=ms.float32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.has_bias = has_bias
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), shape, param_dtype), name="weight")
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.bias = Parameter(initializer(Uniform(bound), (out_channels,), param_dtype), name="bias") \
            if has_bias else None
        self.conv = ops.Conv2D(out_channel=out_channels, kernel_size=kernel_size, mode=1, pad_mode="pad",
                               pad=padding, stride=stride)
        self.bias_add = ops.BiasAdd()
        self.cast = ops.Cast()

    def construct(self, x):
        y = self.conv(x, self.cast(self.weight, x.dtype))
        if self.has_bias:
            y = self.bias_add(y, self.cast(self.bias, x.dtype))
        return y


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm on [B, C, *spatial]: per sample and group of C/G channels, biased variance,
    statistics in fp32; affine ``weight`` / ``bias`` of shape [C]."""

    def __init__(self, num_groups, num_channels, eps=1e-6, param_dtype=ms.float32):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = float(eps)
        self.weight = Parameter(initializer(One(), (num_channels,), param_dtype), name="weight")
        self.bias = Parameter(initializer(Zero(), (num_channels,), param_dtype), name="bias")
        self.cast = ops.Cast()
        self.mean = ops.ReduceMean(keep_dims=True)
        self.rsqrt = ops.Rsqrt()

    def construct(self, x):
        shape = x.shape
        x32 = self.cast(x, ms.float32).reshape(shape[0], self.num_groups, -1)
        centred = sub(x32, self.mean(x32, -1))
        var = self.mean(centred * centred, -1)
        y = mul(centred, self.rsqrt(var + self.eps)).reshape(shape)
        affine_shape = (1, self.num_channels) + (1,) * (len(shape) - 2)
        y = add(mul(y, self.cast(self.weight, ms.float32).reshape(affine_shape)),
                self.cast(self.bias, ms.float32).reshape(affine_shape))
        return self.cast(y, x.dtype)


def upsample_nearest(x, fh, fw):
    """[B, C, H, W] -> [B, C, H*fh, W*fw], every pixel repeated (torch ``interpolate(mode="nearest")``
    for integer factors)."""
    if fh == 1 and fw == 1:
        return x
    b, c, h, w = x.shape
    x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, fh, w, fw))
    return x.reshape(b, c, h * fh, w * fw)


def resize_nearest(x, size):
    """Nearest resize of [B, C, h, w] to ``size`` = (H, W), which must be integer multiples of (h, w)
    (always so in MoVQGAN's decoder, whose feature maps are z's size times powers of two)."""
    h, w = x.shape[-2], x.shape[-1]
    if size[0] % h or size[1] % w:
        raise ValueError(f"resize_nearest: {tuple(size)} is not an integer multiple of {(h, w)}")
    return upsample_nearest(x, size[0] // h, size[1] // w)

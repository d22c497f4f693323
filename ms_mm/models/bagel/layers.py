"""Generic Cells BAGEL needs that `ms_mm.ops` does not have yet: Conv2d, GroupNorm, nearest 2x upsampling.

They follow the ops conventions (parameters in the dtype they were created with, primitives kept as
attributes so a plan could shard them, statistics in fp32) and would move to `ms_mm/ops` unchanged.
"""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, One, Zero, initializer

__all__ = ["Conv2d", "GroupNorm", "upsample_nearest_2x"]


class Conv2d(nn.Cell):
    """NCHW convolution with ``weight [out, in, k, k]`` and ``bias [out]`` (torch's layout), symmetric
    zero padding ``padding`` and square ``stride``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, has_bias=True,
                 param_dtype=ms.float32):
        super().__init__()
        self.out_channels = out_channels
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = Parameter(initializer(HeUniform(), shape, param_dtype), name="weight")
        self.bias = Parameter(initializer(Zero(), (out_channels,), param_dtype), name="bias") if has_bias else None
        self.conv = ops.Conv2D(out_channel=out_channels, kernel_size=kernel_size, mode=1,
                               pad_mode="pad" if padding else "valid", pad=padding, stride=stride)
        self.bias_add = ops.BiasAdd()
        self.cast = ops.Cast()

    def construct(self, x):
        y = self.conv(x, self.cast(self.weight, x.dtype))
        if self.bias is not None:
            y = self.bias_add(y, self.cast(self.bias, x.dtype))
        return y


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm on NCHW (biased variance over each group's channels and pixels), in fp32."""

    def __init__(self, num_groups, num_channels, eps=1e-6, param_dtype=ms.float32):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        self.num_groups = num_groups
        self.eps = float(eps)
        self.weight = Parameter(initializer(One(), (num_channels,), param_dtype), name="weight")
        self.bias = Parameter(initializer(Zero(), (num_channels,), param_dtype), name="bias")
        self.cast = ops.Cast()

    def construct(self, x):
        b, c, h, w = x.shape
        x32 = ops.reshape(self.cast(x, ms.float32), (b, self.num_groups, -1))
        mean = ops.mean(x32, -1, keep_dims=True)
        centered = x32 - mean
        var = ops.mean(centered * centered, -1, keep_dims=True)
        y = ops.reshape(centered * ops.rsqrt(var + self.eps), (b, c, h, w))
        y = y * ops.reshape(self.cast(self.weight, ms.float32), (1, c, 1, 1)) \
            + ops.reshape(self.cast(self.bias, ms.float32), (1, c, 1, 1))
        return self.cast(y, x.dtype)


def upsample_nearest_2x(x):
    """F.interpolate(x, scale_factor=2, mode="nearest") for NCHW: every pixel repeated into a 2x2 block."""
    b, c, h, w = x.shape
    x = ops.broadcast_to(ops.reshape(x, (b, c, h, 1, w, 1)), (b, c, h, 2, w, 2))
    return ops.reshape(x, (b, c, 2 * h, 2 * w))

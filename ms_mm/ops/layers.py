"""Parameter-holding building blocks: Linear, RMSNorm, LayerNorm, Embedding.

Each Cell keeps its primitives as attributes (``self.matmul``, ``self.bias_add``, ...) so a
parallel plan can attach ``.shard()`` strategies from outside without touching the model.
Parameters are stored in the dtype they were created with; the compute dtype follows the
input (weights are cast to it), which is how fp16/bf16 activations run on fp32 master weights.
"""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, One, Zero, initializer

from ms_mm.ops.functional import bprop_mul, broadcast_pair, mul
from ms_mm.ops.switch import sharded, use_fused
import mindspore.ops.auto_generate as _gen


def _init(init, shape, dtype):
    if isinstance(init, (int, float)):
        init = Normal(sigma=float(init))
    return initializer(init, shape, dtype)


class Linear(nn.Cell):
    """y = x @ W^T + b, with ``weight [out, in]`` and ``bias [out]``; x may have any rank."""

    def __init__(self, in_features, out_features, has_bias=True, weight_init=0.02, bias_init="zeros",
                 param_dtype=ms.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = has_bias
        self.weight = Parameter(_init(weight_init, (out_features, in_features), param_dtype), name="weight")
        self.bias = Parameter(_init(bias_init, (out_features,), param_dtype), name="bias") if has_bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.Add()
        self.cast = ops.Cast()
        self.reshape = ops.Reshape()

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_features,)
        x2d = self.reshape(x, (-1, self.in_features))
        y = self.matmul(x2d, self.cast(self.weight, x.dtype))
        if self.has_bias:
            y = self.bias_add(*broadcast_pair(y, self.cast(self.bias, x.dtype)))
        return self.reshape(y, out_shape)


class _RMSNormMath(nn.Cell):
    """The unsharded portable RMSNorm with a hand-written backward; returns (y, 1/rms fp32).

    Autodiff of the forward spends a Pow and a RealDiv (rsqrt's gradient), a Tile and a RealDiv
    (the mean's) and two row sums per norm; the closed form needs one row mean and one column sum:
    dx = inv * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * inv; dw = sum over rows of dy * xhat.
    ``inv`` is a second output only so that the backward can read it (the caller drops it)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = float(eps)
        self.mean = ops.ReduceMean(keep_dims=True)
        self.col_sum = ops.ReduceSum(keep_dims=False)

    def construct(self, x, weight):
        x32 = ops.cast(x, ms.float32)
        inv = ops.rsqrt(self.mean(ops.square(x32), -1) + self.eps)
        return mul(ops.cast(mul(x32, inv), x.dtype), ops.cast(weight, x.dtype)), inv

    def bprop(self, x, weight, out, dout):
        inv = out[1]
        dim = x.shape[-1]
        xhat = bprop_mul(ops.cast(x, ms.float32), inv)
        dy = ops.cast(dout[0], ms.float32)
        g = bprop_mul(dy, ops.cast(weight, ms.float32))
        dx = bprop_mul(inv, g - bprop_mul(xhat, self.mean(g * xhat, -1)))
        dw = self.col_sum(ops.reshape(dy * xhat, (-1, dim)), 0)
        return ops.cast(dx, x.dtype), ops.cast(dw, weight.dtype)


class RMSNorm(nn.Cell):
    """Root-mean-square norm: statistics in fp32, result cast back to the input dtype, then scaled.

    Unsharded portable runs use ``_RMSNormMath`` (closed-form backward); under semi-auto parallel the
    primitives below (autodiff), on Ascend the fused kernel."""

    def __init__(self, dim, eps=1e-6, param_dtype=ms.float32):
        super().__init__()
        self.eps = float(eps)
        self.weight = Parameter(initializer(One(), (dim,), param_dtype), name="weight")
        self.fused = use_fused()
        self.rms_norm = _gen.RmsNorm(epsilon=self.eps)
        self.math = _RMSNormMath(self.eps)
        self.cast = ops.Cast()
        self.square = ops.Square()
        self.mean = ops.ReduceMean(keep_dims=True)
        self.rsqrt = ops.Rsqrt()
        self.mul = ops.Mul()
        self.add = ops.Add()

    def construct(self, x):
        if self.fused:
            return self.rms_norm(x, self.cast(self.weight, x.dtype))[0]
        if not sharded():
            return self.math(x, self.weight)[0]
        x32 = self.cast(x, ms.float32)
        inv = self.rsqrt(self.add(self.mean(self.square(x32), -1), self.eps))
        normed = self.cast(self.mul(x32, inv), x.dtype)
        return self.mul(normed, self.cast(self.weight, x.dtype))


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with ``weight`` and ``bias``; statistics in fp32."""

    def __init__(self, dim, eps=1e-5, param_dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer(One(), (dim,), param_dtype), name="weight")
        self.bias = Parameter(initializer(Zero(), (dim,), param_dtype), name="bias")
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=float(eps))
        self.cast = ops.Cast()

    def construct(self, x):
        y = self.layer_norm(self.cast(x, ms.float32), self.cast(self.weight, ms.float32),
                            self.cast(self.bias, ms.float32))[0]
        return self.cast(y, x.dtype)


class Embedding(nn.Cell):
    """Token embedding as a gather on ``weight [vocab, dim]`` (mint's embedding has no CPU backward)."""

    def __init__(self, vocab_size, dim, weight_init=1.0, param_dtype=ms.float32):
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.weight = Parameter(_init(weight_init, (vocab_size, dim), param_dtype), name="weight")
        self.gather = ops.Gather()

    def construct(self, ids):
        return self.gather(self.weight, ids, 0)


class GatedMLP(nn.Cell):
    """SwiGLU MLP, down(silu(gate(x)) * up(x)), with gate and up fused in ``linear_fc1`` as [gate; up] rows
    (the MM checkpoint layout; one GEMM instead of two)."""

    def __init__(self, hidden_size, intermediate_size, has_bias=False):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.linear_fc1 = Linear(hidden_size, 2 * intermediate_size, has_bias=has_bias)
        self.linear_fc2 = Linear(intermediate_size, hidden_size, has_bias=has_bias)
        self.split = ops.Split(axis=-1, output_num=2)

    def construct(self, x):
        gate_up = self.linear_fc1(x)
        if sharded():
            gate = gate_up[..., :self.intermediate_size]
            up = gate_up[..., self.intermediate_size:]
        else:
            # one Split kernel, whose backward is one Concat; slices (and ops.split) are StridedSlices
            # whose backward writes a full-size zero tensor per half and adds them (AddN)
            gate, up = self.split(gate_up)
        return self.linear_fc2(ops.silu(gate) * up)

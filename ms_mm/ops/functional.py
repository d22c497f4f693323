"""Stateless ops: rotary helpers and the activations whose conventions differ between models.

``apply_rotary`` is the rotate-half (non-interleaved) RoPE. It picks its own kernel: with the Ascend
kernels in use (``ms_mm.ops.kernels()``) the ``RotaryPositionEmbedding`` kernel in mode 0, which is
the same rotate-half form, else the portable math. The choice is a compile-time constant
(``constexpr``), so graph mode compiles one branch and callers never see it.
"""
import numpy as np
from mindspore import Tensor, ops
import mindspore.ops.auto_generate as _gen
from mindspore.ops import constexpr

from ms_mm.ops.switch import use_fused


_rope_kernel = _gen.RotaryPositionEmbedding()


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] along the last axis (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


@constexpr
def _fused_rotary() -> bool:
    return use_fused()


def apply_rotary(x, cos, sin):
    """x * cos + rotate_half(x) * sin. ``cos``/``sin`` broadcast to ``x`` ([B, N, S, D] on Ascend)."""
    if _fused_rotary():
        return _rope_kernel(x, ops.cast(cos, x.dtype), ops.cast(sin, x.dtype), 0)
    return x * cos + rotate_half(x) * sin


def gelu(x, approximate="none"):
    """GELU; ``approximate="none"`` is the exact erf form, ``"tanh"`` the tanh approximation."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate={approximate!r}, expected 'none' or 'tanh'")
    return ops.gelu(x, approximate=approximate)


def silu(x):
    """x * sigmoid(x)."""
    return ops.silu(x)


def swiglu(gate, up):
    """silu(gate) * up, the gated MLP activation of Qwen/LLaMA-style blocks."""
    return ops.silu(gate) * up


_E = Tensor(np.float32(np.e))


def logsumexp(x):
    """log(sum(exp(x))) over the last axis, accurate to about one fp32 ulp. MindSpore's CPU ``exp`` /
    ``log`` / ``logsumexp`` are fast approximations (~1e-5 relative for exp, ~2e-6 absolute for log),
    which puts a z-loss of ~40 off by ~3e-5; ``pow(e, x)`` and ``log1p`` are accurate (the sum is >= 1,
    as the largest term is exactly 1)."""
    m = ops.stop_gradient(x.max(-1, keepdims=True))
    s = ops.pow(_E, x - m).sum(-1)
    return ops.log1p(s - 1.0) + m.squeeze(-1)

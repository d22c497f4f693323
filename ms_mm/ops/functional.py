"""Stateless ops: rotary helpers and the activations whose conventions differ between models.

``apply_rotary`` is the rotate-half (non-interleaved) RoPE. With ``fused=True`` (callers pass the
``use_fused()`` they stored at ``__init__``, so graph mode sees a constant) it runs the Ascend
``RotaryPositionEmbedding`` kernel in mode 0, which is the same rotate-half form.
"""
from mindspore import ops
import mindspore.ops.auto_generate as _gen


_rope_kernel = _gen.RotaryPositionEmbedding()


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] along the last axis (halves, not interleaved pairs)."""
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def apply_rotary(x, cos, sin, fused=False):
    """x * cos + rotate_half(x) * sin. ``cos``/``sin`` broadcast to ``x`` ([B, N, S, D] on Ascend).

    ``fused=True`` selects the Ascend kernel; callers pass ``self.fused`` read from ``kernels()``.
    """
    if fused:
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

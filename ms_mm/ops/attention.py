"""CoreAttention: softmax(q k^T * scale + mask) v for [B, N, S, D] tensors, with GQA.

Ascend runs ``FlashAttentionScore`` (fp16/bf16 only; it takes a boolean "masked" map, so the
additive mask is turned into ``mask < 0``). Everywhere else, and for fp32 on Ascend, it is the
portable batched-matmul form with the softmax in fp32, as the reference eager attention does.
"""
import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.operations.nn_ops import FlashAttentionScore

from ms_mm.ops.switch import use_fused


class CoreAttention(nn.Cell):
    """q ``[B, N, Sq, D]``, k/v ``[B, Nkv, Sk, D]``, optional additive fp32 mask broadcastable to
    ``[B, N, Sq, Sk]`` → ``[B, N, Sq, D]``. KV heads are repeated to N inside (GQA)."""

    def __init__(self, num_heads, num_kv_heads=None, head_dim=None, scale=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"CoreAttention: num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        if scale is None:
            if head_dim is None:
                raise ValueError("CoreAttention: give head_dim or scale")
            scale = 1.0 / math.sqrt(head_dim)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.n_rep = num_heads // num_kv_heads
        self.scale = float(scale)
        self.fused = use_fused()
        self.flash_attention = FlashAttentionScore(head_num=num_heads, scale_value=self.scale,
                                                   input_layout="BNSD")
        self.bmm_qk = ops.BatchMatMul(transpose_b=True)
        self.bmm_pv = ops.BatchMatMul()
        self.softmax = ops.Softmax(axis=-1)
        self.mul = ops.Mul()
        self.add = ops.Add()
        self.cast = ops.Cast()
        self.reshape = ops.Reshape()
        self.tile = ops.Tile()
        self.less = ops.Less()

    def repeat_kv(self, x):
        if self.n_rep == 1:
            return x
        b, n_kv, s, d = x.shape
        x = self.tile(ops.expand_dims(x, 2), (1, 1, self.n_rep, 1, 1))
        return self.reshape(x, (b, n_kv * self.n_rep, s, d))

    def construct(self, q, k, v, mask=None):
        if self.fused and q.dtype != ms.float32:
            masked = None if mask is None else self.cast(self.less(mask, 0.0), ms.uint8)
            return self.flash_attention(q, k, v, None, None, None, masked, None)[3]
        k = self.repeat_kv(k)
        v = self.repeat_kv(v)
        scores = self.cast(self.mul(self.bmm_qk(q, k), self.scale), ms.float32)
        if mask is not None:
            scores = self.add(scores, mask)
        probs = self.cast(self.softmax(scores), q.dtype)
        return self.bmm_pv(probs, v)

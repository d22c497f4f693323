"""CoreAttention: softmax(q k^T * scale + mask) v for [B, N, S, D] tensors, with GQA.

Ascend runs ``FlashAttentionScore`` (fp16/bf16 only; it takes a boolean "masked" map, so the
additive mask is turned into ``mask < 0``). Everywhere else, and for fp32 on Ascend, it is the
portable batched-matmul form with the softmax in fp32, as the reference eager attention does.

The portable form has two spellings of the same maths, chosen at compile time:
- unsharded (stand-alone or data parallel, what runs on CPU): ``_AttentionMath``, a Cell with its own
  backward. The scale is applied to q ([S, D]) instead of the scores ([S, S]); GQA reshapes q to
  [B, Nkv, r*S, D] instead of repeating k and v r times (no Tile forward, no ReduceSum over the copies
  backward); and the softmax gradient is FlashAttention's ``dS = P * (dP - rowsum(dO * O))``, a row
  sum over D instead of autodiff's two [S, S] products and a row sum over S. Same numbers up to fp32
  rounding (tests/test_ops.py checks values and gradients against numpy).
- sharded (semi-auto / auto parallel): the primitives held as attributes (``bmm_qk``, ``mul``,
  ``add``, ``softmax``, ``bmm_pv``, ``tile``) in their 4-D layout, which the parallel plans
  (``ms_mm.parallel.sharding.head_parallel_attention``) give strategies to.
"""
import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops.operations.nn_ops import FlashAttentionScore

from ms_mm.ops.functional import add, bprop_sub
from ms_mm.ops.switch import sharded, use_fused


class _AttentionMath(nn.Cell):
    """The unsharded portable attention with a hand-written backward; returns (out, probs fp32).

    ``construct(q [B, N, Sq, D], k/v [B, Nkv, Sk, D], mask)``; ``mask`` is additive fp32 broadcastable
    to [B, N, Sq, Sk], or ``None`` (then ``has_mask=False``). The probabilities are a second output
    only so that the backward can read them (the caller drops them; autodiff keeps the softmax output
    for its backward too, so no extra memory is held).
    """

    def __init__(self, num_heads, num_kv_heads, scale, has_mask):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.n_rep = num_heads // num_kv_heads
        self.scale = float(scale)
        self.has_mask = has_mask
        self.bmm_nt = ops.BatchMatMul(transpose_b=True)
        self.bmm_nn = ops.BatchMatMul()
        self.bmm_tn = ops.BatchMatMul(transpose_a=True)
        self.softmax = ops.Softmax(axis=-1)
        self.row_sum = ops.ReduceSum(keep_dims=True)

    def _group(self, x):
        """[B, N, S, D] -> [B, Nkv, r*S, D] (heads g*r .. g*r+r-1 share KV head g)."""
        if self.n_rep == 1:
            return x
        b, _, s, d = x.shape
        return ops.reshape(x, (b, self.num_kv_heads, self.n_rep * s, d))

    def _ungroup(self, x, sq):
        if self.n_rep == 1:
            return x
        b, _, _, d = x.shape
        return ops.reshape(x, (b, self.num_heads, sq, d))

    def _probs(self, q, k, mask):
        """fp32 softmax probabilities in the grouped layout [B, Nkv, r*Sq, Sk]."""
        sq, sk = q.shape[2], k.shape[2]
        scores = ops.cast(self.bmm_nt(self._group(q * self.scale), k), ms.float32)
        if self.has_mask:
            if self.n_rep == 1:
                scores = add(scores, mask)
            else:
                b = scores.shape[0]
                if mask.ndim < 4:
                    mask = ops.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
                if mask.shape[1] == 1:
                    mask = ops.expand_dims(mask, 2)                     # [B|1, 1, 1, Sq, Sk]
                else:
                    mask = ops.reshape(mask, (mask.shape[0], self.num_kv_heads, self.n_rep, sq, sk))
                scores = ops.reshape(add(ops.reshape(scores, (b, self.num_kv_heads, self.n_rep, sq, sk)), mask),
                                     (b, self.num_kv_heads, self.n_rep * sq, sk))
        return self.softmax(scores)

    def construct(self, q, k, v, mask):
        probs = self._probs(q, k, mask)
        out = self.bmm_nn(ops.cast(probs, q.dtype), v)
        return self._ungroup(out, q.shape[2]), probs

    def bprop(self, q, k, v, mask, out, dout):
        o, probs = out
        sq = q.shape[2]
        d_o = self._group(dout[0])
        p = ops.cast(probs, q.dtype)
        dv = self.bmm_tn(p, d_o)                                           # P^T dO
        dp = ops.cast(self.bmm_nt(d_o, v), ms.float32)                     # dO V^T
        delta = self.row_sum(ops.cast(d_o, ms.float32) * ops.cast(self._group(o), ms.float32), -1)
        ds = ops.cast(probs * bprop_sub(dp, delta), q.dtype)               # softmax backward
        dq = self._ungroup(self.bmm_nn(ds, k), sq) * self.scale
        dk = self.bmm_tn(ds, self._group(q * self.scale))
        dmask = ops.zeros_like(mask) if self.has_mask else mask
        return dq, dk, dv, dmask


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
        self.math_masked = _AttentionMath(num_heads, num_kv_heads, self.scale, has_mask=True)
        self.math_unmasked = _AttentionMath(num_heads, num_kv_heads, self.scale, has_mask=False)
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
        if not sharded():
            if mask is None:
                return self.math_unmasked(q, k, v, mask)[0]
            return self.math_masked(q, k, v, mask)[0]
        k = self.repeat_kv(k)
        v = self.repeat_kv(v)
        scores = self.cast(self.mul(self.bmm_qk(q, k), self.scale), ms.float32)
        if mask is not None:
            scores = self.add(scores, mask)
        probs = self.cast(self.softmax(scores), q.dtype)
        return self.bmm_pv(probs, v)

"""The faster unsharded spellings of ms_mm.ops (docs/performance.md, "profile") give the numbers of
the plain autodiff they replace, values and gradients:
- ``CoreAttention``'s ``_AttentionMath`` (its own backward: q-side scale, GQA without repeating k/v,
  FlashAttention's softmax gradient) against autodiff through repeat + softmax(q k^T * scale + mask) v,
  for every mask form CoreAttention accepts, graph and PyNative, fp32 and fp16;
- ``cross_entropy_sum`` (one fused softmax-CE kernel) against float64 numpy, ignored rows included;
the models that use them keep their parity (their own fixture tests)."""
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import nn, ops

import ms_mm.ops as mo

RNG = np.random.default_rng(7)


class _Reference(nn.Cell):
    """What CoreAttention computed before: autodiff through the 4-D form."""

    def __init__(self, n, n_kv, d):
        super().__init__()
        self.rep, self.scale = n // n_kv, 1.0 / math.sqrt(d)

    def construct(self, q, k, v, mask):
        if self.rep > 1:
            b, n_kv, s, d = k.shape
            k = ops.tile(ops.expand_dims(k, 2), (1, 1, self.rep, 1, 1)).reshape(b, n_kv * self.rep, s, d)
            v = ops.tile(ops.expand_dims(v, 2), (1, 1, self.rep, 1, 1)).reshape(b, n_kv * self.rep, s, d)
        scores = ops.BatchMatMul(transpose_b=True)(q, k) * self.scale
        if mask is not None:
            scores = scores + mask
        return ops.BatchMatMul()(ops.softmax(scores, -1), v)


class _Loss(nn.Cell):
    def __init__(self, attn, w):
        super().__init__()
        self.attn, self.w = attn, ms.Tensor(w)

    def construct(self, q, k, v, mask):
        return (self.attn(q, k, v, mask) * self.w).sum()


def _grads(attn, q, k, v, mask, w):
    fn = ms.value_and_grad(_Loss(attn, w), grad_position=(0, 1, 2))
    loss, grads = fn(*(ms.Tensor(x) for x in (q, k, v)), None if mask is None else ms.Tensor(mask))
    return float(loss.asnumpy()), [g.asnumpy() for g in grads]


def _mask(kind, b, n, sq, sk):
    if kind == "none":
        return None
    causal = np.triu(np.full((sq, sk), -1e30, np.float32), 1 + sk - sq)
    if kind == "2d":
        return causal
    if kind == "shared":                                     # [1, 1, Sq, Sk], as the ViT's segment masks
        return causal[None, None]
    m = np.repeat(causal[None, None], b, 0)                  # [B, 1, Sq, Sk] with left padding
    m[-1, :, :, :2] = -1e30
    m[-1, :, :2, :2] = 0.0
    if kind == "per_head":
        m = np.repeat(m, n, 1) + RNG.standard_normal((b, n, sq, sk)).astype(np.float32)
    return m


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("n_kv,kind,sq", [(4, "batch", 6), (2, "batch", 6), (1, "shared", 6), (2, "none", 6),
                                          (2, "per_head", 6), (4, "2d", 6), (2, "batch", 1)])
def test_attention_math_matches_autodiff(mode, n_kv, kind, sq):
    ms.set_context(mode=mode)
    try:
        b, n, sk, d = 2, 4, 6, 8
        q = RNG.standard_normal((b, n, sq, d)).astype(np.float32)
        k = RNG.standard_normal((b, n_kv, sk, d)).astype(np.float32)
        v = RNG.standard_normal((b, n_kv, sk, d)).astype(np.float32)
        w = RNG.standard_normal((b, n, sq, d)).astype(np.float32)
        mask = _mask(kind, b, n, sq, sk)
        loss, grads = _grads(mo.CoreAttention(n, n_kv, head_dim=d), q, k, v, mask, w)
        ref_loss, ref_grads = _grads(_Reference(n, n_kv, d), q, k, v, mask, w)
        assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def test_attention_math_fp16_close_to_fp32():
    b, n, n_kv, s, d = 1, 4, 2, 5, 8
    q, k, v = (RNG.standard_normal(shape).astype(np.float32) for shape in
               ((b, n, s, d), (b, n_kv, s, d), (b, n_kv, s, d)))
    w = RNG.standard_normal((b, n, s, d)).astype(np.float32)
    mask = _mask("batch", b, n, s, s)
    attn = mo.CoreAttention(n, n_kv, head_dim=d)
    loss32, g32 = _grads(attn, q, k, v, mask, w)
    fn = ms.value_and_grad(_Loss(attn, w.astype(np.float16)), grad_position=(0, 1, 2))
    loss16, g16 = fn(*(ms.Tensor(x.astype(np.float16)) for x in (q, k, v)), ms.Tensor(mask))
    assert abs(float(loss16.asnumpy()) - loss32) < 2e-2 * max(1.0, abs(loss32))
    for g, r in zip(g16, g32):
        assert g.dtype == ms.float16
        np.testing.assert_allclose(g.asnumpy().astype(np.float32), r, rtol=2e-2, atol=2e-2)


def _ce_total(logits, labels):
    return mo.cross_entropy_sum(logits, labels)[0]


@ops.constexpr
def _always_sharded():  # a constexpr, as ``ms_mm.ops.switch.sharded``: graph mode evaluates it when compiling
    return True


@pytest.mark.parametrize("spelling", ["fused", "sharded"])
def test_cross_entropy_sum_matches_float64(spelling, monkeypatch):
    """Both spellings: the fused kernel, and the log-softmax x one-hot one that semi-auto parallel runs
    (forced here on one device)."""
    if spelling == "sharded":
        import ms_mm.ops.functional as functional
        monkeypatch.setattr(functional, "sharded", _always_sharded)
    t, v = 7, 11
    x = (RNG.standard_normal((t, v)) * 30).astype(np.float32)
    x[1, 0] = -1e4            # an ignored row whose class-0 probability underflows: still loss 0, grad 0
    labels = np.array([0, -100, 2, -100, 4, 1, 10], np.int32)
    loss_fn = ms.value_and_grad(_ce_total)
    loss, grad = loss_fn(ms.Tensor(x), ms.Tensor(labels))
    count = mo.cross_entropy_sum(ms.Tensor(x), ms.Tensor(labels))[1]
    x64 = x.astype(np.float64)
    lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
    ok = labels != -100
    ref = (lse[ok] - x64[ok, labels[ok]]).sum()
    ref_grad = np.exp(x64 - lse[:, None])
    ref_grad[np.flatnonzero(ok), labels[ok]] -= 1.0
    ref_grad[~ok] = 0.0
    assert float(count.asnumpy()) == ok.sum()
    assert abs(float(loss.asnumpy()) - ref) <= 1e-5 * abs(ref)
    np.testing.assert_allclose(grad.asnumpy(), ref_grad, rtol=1e-4, atol=1e-6)
    assert not np.any(grad.asnumpy()[~ok])


class _RMSNormReference(nn.Cell):
    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.eps = ms.Parameter(ms.Tensor(weight), name="weight"), eps

    def construct(self, x):
        x32 = x.astype(ms.float32)
        inv = ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + self.eps)
        return (x32 * inv).astype(x.dtype) * self.weight.astype(x.dtype)


class _NormLoss(nn.Cell):
    def __init__(self, norm, w):
        super().__init__()
        self.norm, self.w = norm, ms.Tensor(w)

    def construct(self, x):
        return (self.norm(x) * self.w).sum()


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_rms_norm_math_matches_autodiff(mode):
    ms.set_context(mode=mode)
    try:
        x = RNG.standard_normal((2, 5, 16)).astype(np.float32)
        w = RNG.standard_normal((2, 5, 16)).astype(np.float32)
        weight = (1.0 + 0.1 * RNG.standard_normal(16)).astype(np.float32)
        results = []
        for norm in (mo.RMSNorm(16, eps=1e-6), _RMSNormReference(weight, 1e-6)):
            norm.weight.set_data(ms.Tensor(weight))
            fn = ms.value_and_grad(_NormLoss(norm, w), grad_position=0, weights=[norm.weight])
            val, (gx, (gw,)) = fn(ms.Tensor(x))
            results.append((float(val.asnumpy()), gx.asnumpy(), gw.asnumpy()))
        (v, gx, gw), (rv, rgx, rgw) = results
        assert abs(v - rv) <= 1e-5 * max(1.0, abs(rv))
        np.testing.assert_allclose(gx, rgx, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(gw, rgw, rtol=1e-4, atol=1e-6)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)

"""ms_mm.ops against independent numpy formulas (portable path, the one this CPU runs)."""
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from ms_mm import ops as mo
from ms_mm.ops import switch as kernels_mod

RNG = np.random.default_rng(0)


def _t(a):
    return Tensor(np.asarray(a))


def test_kernel_switch_env(monkeypatch):
    try:
        monkeypatch.setenv("MS_MM_KERNELS", "ascend")
        kernels_mod._reset_for_tests()
        assert mo.kernels() == "ascend"
        monkeypatch.setenv("MS_MM_KERNELS", "portable")
        assert mo.kernels() == "ascend", "the choice is made once per process"
        kernels_mod._reset_for_tests()
        monkeypatch.setenv("MS_MM_KERNELS", "cuda")
        with pytest.raises(ValueError, match="MS_MM_KERNELS"):
            mo.kernels()
        monkeypatch.delenv("MS_MM_KERNELS")
        kernels_mod._reset_for_tests()
        assert mo.kernels() == "portable"  # device_target is CPU here
    finally:
        kernels_mod._reset_for_tests()


def test_linear_any_rank_and_names():
    lin = mo.Linear(6, 5)
    w = RNG.standard_normal((5, 6)).astype(np.float32)
    b = RNG.standard_normal(5).astype(np.float32)
    lin.weight.set_data(_t(w))
    lin.bias.set_data(_t(b))
    x = RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(lin(_t(x)).asnumpy(), x @ w.T + b, rtol=1e-5, atol=1e-5)
    assert [p.name for p in lin.get_parameters()] == ["weight", "bias"]
    assert [p.name for p in mo.Linear(6, 5, has_bias=False).get_parameters()] == ["weight"]
    # primitives are attributes so a parallel plan can shard them
    assert hasattr(lin.matmul, "shard") and hasattr(lin.bias_add, "shard")


def test_rmsnorm_and_layernorm():
    x = RNG.standard_normal((3, 7, 8)).astype(np.float32)
    w = (1 + 0.1 * RNG.standard_normal(8)).astype(np.float32)
    rms = mo.RMSNorm(8, eps=1e-6)
    rms.weight.set_data(_t(w))
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(rms(_t(x)).asnumpy(), ref, rtol=1e-5, atol=1e-5)
    out16 = rms(_t(x.astype(np.float16)))
    assert out16.dtype == ms.float16
    np.testing.assert_allclose(out16.asnumpy().astype(np.float32), ref, rtol=1e-2, atol=1e-2)

    ln = mo.LayerNorm(8, eps=1e-5)
    b = RNG.standard_normal(8).astype(np.float32)
    ln.weight.set_data(_t(w))
    ln.bias.set_data(_t(b))
    mu = x.mean(-1, keepdims=True)
    ref = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(ln(_t(x)).asnumpy(), ref, rtol=1e-5, atol=1e-5)


def test_embedding_gather():
    emb = mo.Embedding(11, 4)
    ids = np.array([[0, 3, 10], [5, 5, 1]], np.int32)
    np.testing.assert_array_equal(emb(_t(ids)).asnumpy(), emb.weight.asnumpy()[ids])


def _np_attention(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    s = np.einsum("bnqd,bnkd->bnqk", q, k) * scale
    if mask is not None:
        s = s + mask
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bnkd->bnqd", p, v)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_core_attention_gqa_mask(n_kv):
    b, n, s, d = 2, 4, 5, 8
    q = RNG.standard_normal((b, n, s, d)).astype(np.float32)
    k = RNG.standard_normal((b, n_kv, s, d)).astype(np.float32)
    v = RNG.standard_normal((b, n_kv, s, d)).astype(np.float32)
    mask = np.triu(np.full((s, s), -1e9, np.float32), 1)[None, None].repeat(b, 0)
    mask[1, :, :, :2] = -1e9  # left padding in the second sample
    mask[1, :, :2, :2] = 0.0
    attn = mo.CoreAttention(n, n_kv, head_dim=d)
    out = attn(_t(q), _t(k), _t(v), _t(mask)).asnumpy()
    np.testing.assert_allclose(out, _np_attention(q, k, v, mask, 1 / math.sqrt(d)), rtol=1e-5, atol=1e-5)
    out = attn(_t(q), _t(k), _t(v)).asnumpy()
    np.testing.assert_allclose(out, _np_attention(q, k, v, None, 1 / math.sqrt(d)), rtol=1e-5, atol=1e-5)


def test_core_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        mo.CoreAttention(4, 3, head_dim=8)


def test_rotary_matches_complex_rotation():
    # rotate-half RoPE == multiplying (x_i, x_{i+D/2}) as a complex number by e^{i*theta}
    d = 8
    x = RNG.standard_normal((1, 2, 3, d)).astype(np.float32)
    theta = RNG.standard_normal((3, d // 2)).astype(np.float32)
    emb = np.concatenate([theta, theta], -1)
    out = mo.apply_rotary(_t(x), _t(np.cos(emb)), _t(np.sin(emb))).asnumpy()
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * theta)
    np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mo.rotate_half(_t(x)).asnumpy(),
                                  np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1))


def test_activations():
    x = np.linspace(-4, 4, 33).astype(np.float32)
    erf = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(mo.gelu(_t(x)).asnumpy(), erf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mo.gelu(_t(x), "tanh").asnumpy(), tanh, rtol=1e-5, atol=1e-6)
    assert np.abs(mo.gelu(_t(x)).asnumpy() - tanh).max() > 1e-4  # the two conventions do differ
    np.testing.assert_allclose(mo.silu(_t(x)).asnumpy(), x / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="approximate"):
        mo.gelu(_t(x), "fast")


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_gelu_tanh_value_and_gradient(mode):
    """The tanh GELU (spelled out on CPU, the GeLU kernel elsewhere) against its float64 formula and
    derivative, in both modes."""
    x = RNG.standard_normal((6, 40)).astype(np.float32) * 3
    w = RNG.standard_normal((6, 40)).astype(np.float32)
    x64, c = x.astype(np.float64), math.sqrt(2 / math.pi)
    t = np.tanh(c * (x64 + 0.044715 * x64 ** 3))
    want = 0.5 * x64 * (1 + t)
    want_grad = w * (0.5 * (1 + t) + 0.5 * x64 * (1 - t ** 2) * c * (1 + 3 * 0.044715 * x64 ** 2))

    def loss(v, weight):
        return (mo.gelu(v, "tanh") * weight).sum()

    previous = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        fn = ms.value_and_grad(loss)
        if mode == ms.GRAPH_MODE:
            fn = ms.jit(fn)
        value, grad = fn(_t(x), _t(w))
    finally:
        ms.set_context(mode=previous)
    np.testing.assert_allclose(float(value.asnumpy()), float((want * w).sum()), rtol=1e-5)
    np.testing.assert_allclose(grad.asnumpy(), want_grad, rtol=1e-5, atol=1e-5)


class _Block(nn.Cell):
    def __init__(self):
        super().__init__()
        self.emb = mo.Embedding(10, 16)
        self.norm = mo.RMSNorm(16)
        self.qkv = mo.Linear(16, 32)
        self.attn = mo.CoreAttention(4, 2, head_dim=4)

    def construct(self, ids, mask):
        h = self.norm(self.emb(ids))
        b, s, _ = h.shape
        qkv = self.qkv(h)
        q = qkv[..., :16].reshape(b, s, 4, 4).transpose(0, 2, 1, 3)
        k = qkv[..., 16:24].reshape(b, s, 2, 4).transpose(0, 2, 1, 3)
        v = qkv[..., 24:].reshape(b, s, 2, 4).transpose(0, 2, 1, 3)
        return mo.gelu(self.attn(q, k, v, mask)).sum()


def test_graph_mode_grad_matches_pynative():
    net = _Block()
    ids = _t(np.array([[1, 2, 3, 4, 5]], np.int32))
    mask = _t(np.triu(np.full((5, 5), -1e9, np.float32), 1)[None, None])
    grad_fn = ms.value_and_grad(net, None, net.trainable_params())
    loss_py, grads_py = grad_fn(ids, mask)
    loss_g, grads_g = ms.jit(grad_fn)(ids, mask)
    np.testing.assert_allclose(loss_g.asnumpy(), loss_py.asnumpy(), rtol=1e-6)
    for a, b in zip(grads_g, grads_py):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(grads_g[0].asnumpy()).sum() > 0

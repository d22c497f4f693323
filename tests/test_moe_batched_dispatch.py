"""The expert-parallel dispatch of ``RoutedExperts`` (``dispatch = "batched"``: batch matmuls over the
stacked expert weights) computes what the portable per-expert loop computes, forward and backward."""
import numpy as np

import mindspore as ms
from mindspore import Tensor

from ms_mm.ops.moe import RoutedExperts


def _run(dispatch, x, idx, w):
    ms.set_seed(0)
    experts = RoutedExperts(4, 16, 8)
    experts.dispatch = dispatch
    params = experts.trainable_params()
    def objective(a):  # a def, not a lambda: graph mode (set by other tests) parses it from source
        y = experts(a, idx, w)
        return y.sum() * 0.5 + (y ** 2).sum()

    grad_fn = ms.value_and_grad(objective, grad_position=0, weights=params)
    out = experts(x, idx, w).asnumpy()
    _, (gx, gw) = grad_fn(x)
    return out, gx.asnumpy(), {p.name: g.asnumpy() for p, g in zip(params, gw)}


def test_batched_equals_portable():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((6, 16)).astype(np.float32))
    idx = Tensor(np.array([[0, 3], [1, 2], [3, 1], [2, 0], [0, 1], [3, 2]], np.int32))
    w = Tensor(rng.random((6, 2)).astype(np.float32))
    ref = _run("portable", x, idx, w)
    got = _run("batched", x, idx, w)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == ref[2].keys() and len(ref[2]) == 2
    for name in ref[2]:
        np.testing.assert_allclose(got[2][name], ref[2][name], rtol=1e-5, atol=1e-6, err_msg=name)

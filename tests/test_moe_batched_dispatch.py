"""The dispatches of ``RoutedExperts`` compute what the portable per-expert loop computes, forward and
backward: "batched" (the expert-parallel plan's batch matmuls over the stacked expert weights) and "blocked"
(the CPU default: the choices sorted by expert into blocks, only the chosen pairs computed), the latter
also with uneven loads (an expert no token chose, blocks partly padding)."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_mm.ops.moe import RoutedExperts, block_rows


def _run(dispatch, x, idx, w):
    ms.set_seed(0)
    experts = RoutedExperts(4, 16, 8)
    rng = np.random.default_rng(7)    # weights of O(1) outputs, so that the tolerances below mean something
    for p in experts.trainable_params():
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
    experts.dispatch = dispatch
    params = experts.trainable_params()
    def objective(a, b):  # a def, not a lambda: graph mode (set by other tests) parses it from source
        y = experts(a, idx, b)
        return y.sum() * 0.5 + (y ** 2).sum()

    grad_fn = ms.value_and_grad(objective, grad_position=(0, 1), weights=params)
    out = experts(x, idx, w).asnumpy()
    _, ((gx, gr), gw) = grad_fn(x, w)
    return out, gx.asnumpy(), gr.asnumpy(), {p.name: g.asnumpy() for p, g in zip(params, gw)}


def _compare(got, ref):
    """fp32 noise: other summation orders, over up to ~500 terms for the weight gradients (atol scaled by
    each tensor's largest value)."""
    assert np.abs(ref[0]).mean() > 0.1       # outputs of O(1)
    for a, b, what in zip(got[:3], ref[:3], ("output", "input grad", "routing-weight grad")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * np.abs(b).max(), err_msg=what)
    assert got[3].keys() == ref[3].keys() and len(ref[3]) == 2
    for name in ref[3]:
        np.testing.assert_allclose(got[3][name], ref[3][name], rtol=1e-5, atol=2e-6 * np.abs(ref[3][name]).max(),
                                   err_msg=name)


def test_batched_equals_portable():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((6, 16)).astype(np.float32))
    idx = Tensor(np.array([[0, 3], [1, 2], [3, 1], [2, 0], [0, 1], [3, 2]], np.int32))
    w = Tensor(rng.random((6, 2)).astype(np.float32))
    _compare(_run("batched", x, idx, w), _run("portable", x, idx, w))


@pytest.mark.parametrize("tokens,k", [(6, 2), (37, 2), (150, 3)])
def test_blocked_equals_portable_with_uneven_loads(tokens, k):
    rng = np.random.default_rng(tokens)
    x = Tensor(rng.standard_normal((tokens, 16)).astype(np.float32))
    # expert 2 gets no token; expert 0 most of them
    idx = np.stack([rng.choice([0, 1, 3], size=k, replace=False, p=[0.6, 0.25, 0.15]) for _ in range(tokens)])
    w = Tensor(rng.random((tokens, k)).astype(np.float32))
    _compare(_run("blocked", x, Tensor(idx.astype(np.int32)), w), _run("portable", x, Tensor(idx.astype(np.int32)), w))
    # the blocks: at least 8 rows, a power of two; at 150 x 3 choices over 4 experts, 32 (half the mean share)
    assert block_rows(tokens * k, 4) == {6: 8, 37: 8, 150: 32}[tokens]

"""Issue 9, point 4 (memory): no element-wise kernel broadcasts on CPU, and no Transpose kernel.

MindSpore 2.9's CPU arithmetic kernels broadcast two different-shaped inputs through index tables
(one 8-byte offset per output element per input) built at the first launch and kept for the graph's
life: at Qwen2.5-VL's bench shape they were ~430 MB of the step's resident memory, at 1024 tokens
gigabytes. `ms_mm.ops.functional.broadcast_pair` tiles the smaller operand first. Here: the helpers
give numpy's values and gradients, and every family's tiny train step compiles without a
broadcasting kernel of any size that matters (`scripts/cpu_broadcasts.py` reads the graph).

The CPU `Transpose` kernel keeps a table of one 8-byte offset per output element the same way (built
with the graph); `ms_mm.ops.functional.permute` moves the data by row Gathers or Unstack + Stack
instead. Here: its values and gradients are numpy's for every plan it picks, and no tiny train step
has a Transpose of activation size left."""
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from ms_mm.ops import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import cpu_broadcasts  # noqa: E402

RNG = np.random.default_rng(7)
SHAPES = [((2, 3, 4), (3, 1)), ((2, 1, 4), (1, 3, 1)), ((5,), (5,)), ((2, 3), (1,)), ((4, 1), (1, 4)),
          ((1, 4, 6), (2, 1, 6))]


class _Weighted(nn.Cell):
    def __init__(self, fn, w):
        super().__init__()
        self.fn, self.w = fn, ms.Tensor(w)

    def construct(self, x, y):
        return (self.fn(x, y) * self.w).sum()


def _unbroadcast(g, shape):
    """Sum a gradient of the broadcast shape back to an operand's shape (numpy)."""
    while g.ndim > len(shape):
        g = g.sum(0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis, keepdims=True)
    return g


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("x_shape,y_shape", SHAPES)
def test_helpers_give_numpy_values_and_gradients(mode, x_shape, y_shape):
    ms.set_context(mode=mode)
    try:
        x = RNG.standard_normal(x_shape).astype(np.float32)
        y = (RNG.uniform(0.5, 2.0, y_shape) * RNG.choice([-1, 1], y_shape)).astype(np.float32)
        out_shape = np.broadcast_shapes(x_shape, y_shape)
        w = RNG.standard_normal(out_shape).astype(np.float32)
        wx, wy = np.broadcast_to(x, out_shape).astype(np.float64), np.broadcast_to(y, out_shape).astype(np.float64)
        cases = {F.add: (wx + wy, w, w), F.sub: (wx - wy, w, -w), F.mul: (wx * wy, w * wy, w * wx),
                 F.div: (wx / wy, w / wy, -w * wx / wy ** 2)}
        for fn, (value, gx, gy) in cases.items():
            loss, (dx, dy) = ms.value_and_grad(_Weighted(fn, w), grad_position=(0, 1))(ms.Tensor(x), ms.Tensor(y))
            np.testing.assert_allclose(float(loss.asnumpy()), (value * w).sum(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(dx.asnumpy(), _unbroadcast(gx, x_shape), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(dy.asnumpy(), _unbroadcast(gy, y_shape), rtol=1e-5, atol=1e-5)
            assert dx.shape == x_shape and dy.shape == y_shape
        a, b = F.broadcast_pair(ms.Tensor(x), ms.Tensor(y))
        expect = out_shape if int(np.prod(x_shape)) > 1 and int(np.prod(y_shape)) > 1 else None
        if expect is not None:   # tiled to one shape on CPU, the values those of numpy's broadcast
            assert a.shape == expect and b.shape == expect
            np.testing.assert_array_equal(a.asnumpy(), np.broadcast_to(x, expect))
            np.testing.assert_array_equal(b.asnumpy(), np.broadcast_to(y, expect))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


PERMUTES = [((2, 5, 3, 4), (0, 2, 1, 3)),            # [B, S, N, D] -> [B, N, S, D]: rows
            ((2, 3, 5, 4), (0, 2, 1, 3)),            # and back
            ((3, 4, 3, 2, 5), (2, 0, 3, 1, 4)),      # the vision qkv split: rows
            ((2, 3, 2, 4, 2, 3), (0, 2, 4, 1, 3, 5)),  # the patch unfold: rows
            ((2, 1, 7, 3, 2), (0, 1, 2, 4, 3)),      # the last axis moves: Unstack + Stack
            ((2, 2, 3, 2, 3, 5), (0, 1, 3, 5, 2, 4)),  # the projector's unfold: two Unstack + Stack
            ((3, 1, 2, 4), (1, 2, 0, 3)),            # size-1 axes among the rows
            ((2, 1, 3), (1, 0, 2)),                  # only a size-1 axis moves: a reshape
            ((70, 80), (1, 0))]                      # no plan (both axes > 64): the Transpose kernel
PLANS = ["rows", "rows", "rows", "rows", "stack", "stack", "rows", "reshape", None]


class _Permuted(nn.Cell):
    def __init__(self, perm, w):
        super().__init__()
        self.perm, self.w = perm, ms.Tensor(w)

    def construct(self, x):
        return (F.permute(x, self.perm) * self.w).sum(), F.permute(x, self.perm)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("case", range(len(PERMUTES)))
def test_permute_gives_numpy_values_and_gradients(mode, case):
    shape, perm = PERMUTES[case]
    plan = F._permute_plan(shape, perm)
    assert (plan[0] if plan else None) == PLANS[case]
    ms.set_context(mode=mode)
    try:
        x = RNG.standard_normal(shape).astype(np.float32)
        w = RNG.standard_normal(np.transpose(x, perm).shape).astype(np.float32)
        (loss, out), dx = ms.value_and_grad(_Permuted(perm, w), has_aux=True)(ms.Tensor(x))
        np.testing.assert_array_equal(out[0].asnumpy() if isinstance(out, tuple) else out.asnumpy(),
                                      np.transpose(x, perm))
        np.testing.assert_array_equal(dx.asnumpy(), np.transpose(w, np.argsort(perm)))
        np.testing.assert_allclose(float(loss.asnumpy()), float((np.transpose(x, perm) * w).sum()),
                                   rtol=1e-5, atol=1e-5)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


@pytest.mark.parametrize("family,preset", [("qwen2_5_vl", "tiny"), ("deepseek_vl2", "tiny-deepseek"),
                                           ("bagel", "bagel-tiny"), ("lumina_mgpt2", "lumina-tiny")])
def test_tiny_train_step_compiles_without_broadcasting_kernels(tmp_path, family, preset):
    env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_SAVE_GRAPHS_PATH=str(tmp_path), GLOG_v="3")
    run = subprocess.run([sys.executable, str(REPO / "tests" / "broadcast_probe.py"), family, preset],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    graphs = sorted(tmp_path.glob("graph_build_*.ir"))
    assert graphs, "no compiled graph was saved"
    found = [row for g in graphs for row in cpu_broadcasts.scan(str(g))]
    # the whole forward + backward is scanned: the probe must have seen its element-wise kernels
    assert sum(1 for g in graphs for line in open(g) if " = PrimFunc_Mul(" in line) > 10
    # what is left may only be small (the router's [tokens, experts] softmax backward inside MindSpore's
    # own bprop); nothing of the size of an activation or attention scores
    big = [(op, shapes, out, src) for op, shapes, out, src in found if np.prod(out) > 4096]
    assert not big, "\n".join(f"{op} {shapes} -> {out} at {src}" for op, shapes, out, src in big)
    # no Transpose of an activation's size either (permute); weights' transposes may stay
    moved = [(op, out, src) for g in graphs for op, out, src in cpu_broadcasts.scan_tables(str(g))
             if op == "Transpose" and np.prod(out) > 4096]
    assert not moved, "\n".join(f"{op} -> {out} at {src}" for op, out, src in moved)

"""StackedPipelineCell on CPU (stand-alone): micro batch i of the stacked inputs is exactly x[i]."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import nn, ops

from ms_mm.parallel.pipeline import StackedPipelineCell


class _Probe(nn.Cell):
    """Loss-like scalar that depends on every input's values and shapes: sum(a * w) + sum(b) * 10."""

    def __init__(self):
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(np.arange(12, dtype=np.float32).reshape(3, 4)), name="w")

    def construct(self, a, b):
        return ops.reduce_sum(a * self.w) + ops.reduce_sum(ops.cast(b, ms.float32)) * 10.0


def test_sums_the_network_over_micro_batches():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 3, 4)).astype(np.float32)      # 3 micro batches of [3, 4]
    b = rng.integers(0, 5, size=(3, 2, 5, 7)).astype(np.int32)  # 3 micro batches of [2, 5, 7]
    probe = _Probe()
    expected = sum(float(probe(ms.Tensor(a[i]), ms.Tensor(b[i])).asnumpy()) for i in range(3))
    got = StackedPipelineCell(probe, 3)(ms.Tensor(a), ms.Tensor(b))
    assert float(got.asnumpy()) == pytest.approx(expected, rel=1e-6)
    # the first micro batch alone
    assert float(StackedPipelineCell(probe, 1)(ms.Tensor(a), ms.Tensor(b)).asnumpy()) == pytest.approx(
        float(probe(ms.Tensor(a[0]), ms.Tensor(b[0])).asnumpy()), rel=1e-6)


def test_keeps_parameter_names_and_rejects_bad_micro_size():
    cell = StackedPipelineCell(_Probe(), 2)
    assert [p.name for p in cell.trainable_params()] == ["w"]
    with pytest.raises(ValueError, match="micro_size=0 must be a positive int"):
        StackedPipelineCell(_Probe(), 0)

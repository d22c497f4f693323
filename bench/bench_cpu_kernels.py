"""MindSpore CPU kernels against the spelling `ms_mm.ops` uses instead: forward + backward, graph mode.

    python bench/bench_cpu_kernels.py [--calls 300] [--threads 2]

For each case both graphs are compiled first, then called alternately (`--calls` of each, so that a
change in the machine's speed hits both alike), and the median and minimum time per call are printed
with their ratio. Cases: GELU tanh form (`ops.gelu(approximate="tanh")`'s GeLU / GeLUGrad kernels against
`ms_mm.ops.gelu(x, "tanh")`'s CPU spelling) and GELU erf form (the kernels, which ms-mm keeps, against
their spelling with `erf`), on the [384, 256] activation of the DeepSeek-VL2 bench's SigLIP MLP.
Not part of the test suite: timings belong in benchmarks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=2, default=(384, 256))
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))

    import mindspore as ms
    from mindspore import nn, ops

    from ms_mm.ops import gelu

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    inv_sqrt2 = float(1 / np.sqrt(2))

    class TanhKernel(nn.Cell):
        def construct(self, x):
            return ops.gelu(x, approximate="tanh")

    class TanhMsMm(nn.Cell):
        def construct(self, x):
            return gelu(x, "tanh")

    class ErfKernel(nn.Cell):
        def construct(self, x):
            return ops.gelu(x, approximate="none")

    class ErfSpelled(nn.Cell):
        def construct(self, x):
            return 0.5 * x * (1.0 + ops.erf(x * inv_sqrt2))

    class Loss(nn.Cell):
        def __init__(self, act):
            super().__init__()
            self.act = act

        def construct(self, x, w):
            return (self.act(x) * w).sum()

    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal(a.shape).astype(np.float32))
    w = ms.Tensor(rng.standard_normal(a.shape).astype(np.float32))
    print(f"forward + backward of a {list(a.shape)} fp32 tensor, {a.calls} interleaved calls each, "
          f"{a.threads} threads, load average {os.getloadavg()[0]:.2f}")
    for case, pair in (("GELU tanh", (("kernels", TanhKernel()), ("ms_mm.ops.gelu", TanhMsMm()))),
                       ("GELU erf", (("kernels (kept)", ErfKernel()), ("spelled with erf", ErfSpelled())))):
        fns = {}
        for name, act in pair:
            fn = ms.jit(ms.value_and_grad(Loss(act)))
            fn(x, w)
            fns[name] = fn
        times = {name: [] for name in fns}
        for _ in range(a.calls):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                value, grad = fn(x, w)
                grad.asnumpy()
                times[name].append(time.perf_counter() - t0)
        (n0, t0), (n1, t1) = times.items()
        for name, t in times.items():
            print(f"  {case:10s} {name:18s} median {1e3 * np.median(t):7.3f} ms   min {1e3 * min(t):7.3f} ms")
        print(f"  {case:10s} ratio {n1} / {n0}: median {np.median(t1) / np.median(t0):.2f}x, "
              f"min {min(t1) / min(t0):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

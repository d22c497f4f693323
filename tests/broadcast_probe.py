"""Compile and run one forward + backward of a family's tiny model on its synthetic batch, fp32 on CPU.

    MS_DEV_SAVE_GRAPHS=1 MS_DEV_SAVE_GRAPHS_PATH=DIR python tests/broadcast_probe.py FAMILY PRESET

Used by ``tests/test_cpu_broadcasts.py`` (in a subprocess, as saving graphs is a process setting) to
read the compiled graph's broadcasting element-wise kernels with ``scripts/cpu_broadcasts.py``.
"""
import sys

import mindspore as ms
import numpy as np


def main(family_name: str, preset: str) -> int:
    from ms_mm import registry

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(0)
    fam = registry.get(family_name)
    config = fam.presets[preset]()
    net = fam.build_model(config, ms.float32)
    net.set_train(True)
    batch = fam.synthetic_batch(config, 2, 64)
    args = [ms.Tensor(np.asarray(batch[k])) for k in fam.input_names]
    weights = net.trainable_params()
    out, grads = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))(*args)
    loss = float(out[0].asnumpy() if isinstance(out, tuple) else out.asnumpy())
    print(f"loss {loss:.6f}, {len(grads)} gradients")
    return 0 if np.isfinite(loss) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

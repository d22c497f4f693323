"""The Ascend kernel path of DeepSeek-VL2 compiled on a simulated Ascend device (MindSpore DryRun).

With ``MS_MM_KERNELS=ascend`` the model uses the fused kernels (flash attention for fp16, RmsNorm,
and the MoE path ``moe_token_permute`` -> grouped matmul -> ``moe_token_unpermute``), none of
which run on this CPU. DryRun level 0 type- and shape-checks the whole graph on the host: a wrong
operand dtype or argument fails here with MindSpore's own error. Nothing is computed, so this says
nothing about numerics (the CPU parity tests do).
"""
import subprocess
import sys
from pathlib import Path

from dryrun_support import fake_cann_root  # noqa: F401  (session fixture)
from ms_mm.parallel.fake_cann import dryrun_env

REPO = Path(__file__).resolve().parents[1]
MARKER = "DSVL2_ASCEND_STEP_COMPILED"

WORKER = r'''
import sys
import numpy as np
import mindspore as ms
from mindspore import nn

ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("Ascend")
from ms_mm.ops import kernels
from ms_mm.models.deepseek_vl2 import (MODEL_INPUT_NAMES, DeepseekVL2Config, DeepseekVL2ForCausalLM,
                                       build_model_inputs)

assert kernels() == "ascend", kernels()
config = DeepseekVL2Config.preset("tiny")
net = DeepseekVL2ForCausalLM(config, compute_dtype=ms.float16)
feed = build_model_inputs(dict(np.load(sys.argv[1])), config)
args = [ms.Tensor(feed[k]) for k in MODEL_INPUT_NAMES]


class Objective(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, *a):
        return self.net(*a)[0]


step = nn.TrainOneStepCell(Objective(net), nn.SGD(net.trainable_params(), 0.01))
step(*args)
print("''' + MARKER + r'''")
'''


def test_tiny_train_step_compiles_for_ascend(fake_cann_root, fixture_root, tmp_path):  # noqa: F811
    env = dryrun_env(fake_cann_root, rank_id=0, rank_size=1, level=0)
    env["MS_MM_KERNELS"] = "ascend"
    env["PYTHONPATH"] = str(REPO) + ":" + env.get("PYTHONPATH", "")
    inputs = fixture_root / "deepseek_vl2" / "forward" / "inputs.npz"
    worker = tmp_path / "worker.py"  # graph mode parses source: the Cell must live in a file
    worker.write_text(WORKER)
    proc = subprocess.run([sys.executable, str(worker), str(inputs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.returncode == 0 and MARKER in proc.stdout, tail

"""Data parallel with msrun on CPU: 2 workers train the tiny Qwen2.5-VL / DeepSeek-VL2 for a few steps.

Checks: the two replicas end with identical parameters, and they match one process that sees
the same global batch as 2 accumulated micro-batches (the same samples: the loader deals record
k of the epoch order to rank k % 2). Tolerance: atol 1e-6 on parameters after 3 AdamW steps at
lr 1e-4 (fp32 all-reduce noise; on this CPU the results are in fact bit-identical).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ms_mm.training import mm_checkpoint as mmc
from training_logs import logged

REPO = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_qwen2_5_vl(d, env):
    py = sys.executable
    subprocess.run([py, "-m", "convert.tiny", "qwen2_5_vl", "--out", str(d / "hf")], check=True, env=env, cwd=d)
    subprocess.run([py, "-m", "convert.cli", "Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", str(d / "mm"),
                    "--cfg.hf_config.hf_dir", str(d / "hf")], check=True, env=env, cwd=d)
    from adapters.qwen2_5_vl import config_from_hf
    from ms_mm.models.qwen2_5_vl.demo import demo_data_config, make_demo_dataset
    from ms_mm.models.qwen2_5_vl.config import mindspeed_model_json as qwen2_5_vl_model_json

    make_demo_dataset(d / "data", n=16, seed=1)
    config = config_from_hf(json.loads((d / "hf" / "config.json").read_text()))
    freeze = {"vision_encoder": False, "vision_projector": False, "text_decoder": False}
    (d / "model.json").write_text(json.dumps(qwen2_5_vl_model_json(config, freeze=freeze)))
    (d / "data.json").write_text(json.dumps(demo_data_config(d / "data", processor_dir=d / "hf", cutoff_len=96)))


def _setup_deepseek_vl2(d, env):
    py = sys.executable
    subprocess.run([py, "-m", "convert.tiny", "deepseek_vl2", "--out", str(d / "hf")], check=True, env=env, cwd=d)
    subprocess.run([py, "-m", "convert.cli", "DeepSeekVLConverter", "hf_to_mm", "--cfg.mm_dir", str(d / "mm"),
                    "--cfg.hf_config.hf_dir", str(d / "hf"), "--cfg.trust_remote_code", "True"],
                   check=True, env=env, cwd=d)
    from adapters.deepseek_vl2 import config_from_hf
    from ms_mm.models.deepseek_vl2.demo import demo_data_config, make_demo_dataset
    from ms_mm.models.deepseek_vl2.config import mindspeed_model_json as deepseek_vl2_model_json

    make_demo_dataset(d / "data", n=16, seed=1)
    config = config_from_hf(json.loads((d / "hf" / "config.json").read_text()))
    (d / "model.json").write_text(json.dumps(deepseek_vl2_model_json(config)))   # nothing frozen
    (d / "data.json").write_text(json.dumps(demo_data_config(d / "data", processor_dir=d / "hf", max_length=128)))


# family -> (setup, parameter-name parts whose tensors may stay put: SigLIP's attention-pool head is
# unused, as upstream ignore_head)
FAMILIES = {"qwen2_5_vl": (_setup_qwen2_5_vl, ()),
            "deepseek_vl2": (_setup_deepseek_vl2, (".attn_pool.",))}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_setup(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"dp_{request.param}")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    FAMILIES[request.param][0](d, env)
    return d, request.param


def _train_args(d):
    return ["--mm-model", str(d / "model.json"), "--mm-data", str(d / "data.json"), "--load", str(d / "mm"),
            "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "3", "--lr", "1e-4",
            "--seed", "3", "--log-interval", "1", "--num-workers", "1"]


def test_msrun_two_workers_match_single_process(tiny_setup):
    d, family = tiny_setup
    # msrun starts `python`: make it this interpreter even when the venv is not activated
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    env = dict(os.environ, PYTHONPATH=str(REPO), GLOG_v="3", MS_MM_DEVICE_TARGET="CPU", PATH=path)
    entry = str(REPO / "ms_mm" / "training" / "pretrain_vlm.py")
    log_dir = d / "msrun_log"
    shutil.rmtree(log_dir, ignore_errors=True)
    cmd = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}", "--join=True",
           f"--log_dir={log_dir}", entry, *_train_args(d), "--save", str(d / "dp_save")]
    res = subprocess.run(cmd, cwd=d, env=dict(env, MS_MM_DUMP_PARAMS_DIR=str(d / "dp")), capture_output=True,
                         text=True, timeout=420)
    logs = "".join(p.read_text()[-3000:] for p in sorted(log_dir.glob("worker_*.log")))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + logs
    worker0 = (log_dir / "worker_0.log").read_text()
    assert "world size 2 (dp 2)" in worker0 and worker0.count("lm loss") == 3

    single = subprocess.run([sys.executable, entry, *_train_args(d)], cwd=d,
                            env=dict(env, MS_MM_DUMP_PARAMS_DIR=str(d / "single")), capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    assert "gradient accumulation 2" in single.stdout

    r0 = mmc.read_safetensors(d / "dp" / "rank_0.safetensors")
    r1 = mmc.read_safetensors(d / "dp" / "rank_1.safetensors")
    one = mmc.read_safetensors(d / "single" / "rank_0.safetensors")
    init = mmc.load_model(d / "mm", float32=True)
    assert r0.keys() == r1.keys() == one.keys()
    may_stay = FAMILIES[family][1]
    still = []
    for name in r0:
        np.testing.assert_array_equal(r0[name], r1[name], err_msg=f"replicas differ: {name}")
        np.testing.assert_allclose(r0[name], one[name], rtol=0, atol=1e-6, err_msg=name)
        if np.array_equal(r0[name], init[name]):
            still.append(name)
    # every parameter trained (nothing frozen), so the check is not vacuous
    assert not [n for n in still if not any(part in n for part in may_stay)], still
    assert len(still) < len(r0) // 4, still

    def losses(text):
        return [float(x.split("lm loss: ")[1].split()[0]) for x in text.splitlines() if "lm loss: " in x]

    # rank 0 saved once, with each rank's data position
    assert mmc.latest_iteration(d / "dp_save") == 3
    data_state = json.loads((d / "dp_save" / "iter_0000003" / "data_state.json").read_text())
    assert [s["rank"] for s in data_state["per_rank"]] == [0, 1]
    assert all(s["batches"] == 3 for s in data_state["per_rank"])
    saved = mmc.load_model(d / "dp_save")
    for name in (sorted(r0)[0], sorted(r0)[-1]):
        np.testing.assert_array_equal(saved[name], r0[name], err_msg=name)

    # the logged loss is the global-batch mean in both runs
    np.testing.assert_allclose(losses(worker0), losses(single.stdout), rtol=1e-5)
    if family == "deepseek_vl2":
        # so are the family's metrics: each rank's values averaged over the ranks == the single
        # process's values averaged over its 2 micro-batches
        for name in ("ce loss", "moe aux loss", "expert load max/mean", "expert load cv"):
            dp_values, single_values = logged(worker0, name), logged(single.stdout, name)
            assert dp_values.shape[0] == 3, (name, dp_values)
            np.testing.assert_allclose(dp_values, single_values, rtol=1e-5, err_msg=name)

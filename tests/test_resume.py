"""Checkpoint resume and crash safety of the training engine (toy family: fast, same code paths).

* stop after N steps + resume == one uninterrupted run (losses, LR, final weights);
* a process killed inside the staged write of a checkpoint leaves the previous checkpoint as the
  latest one, loadable, and training resumes from it;
* the --no-save-* / --no-load-* switches are honoured.
"""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ms_mm.training import mm_checkpoint as mmc
from ms_mm.training.arguments import parse_args
from ms_mm.training.trainer import train
from training_logs import logged

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def toy_jsons(tmp_path):
    model = {"model_id": "toy_vlm",
             "image_encoder": {"vision_encoder": {"freeze": False}, "vision_projector": {"freeze": False}},
             "text_decoder": {"freeze": False}}
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "data.json").write_text(json.dumps({"num_samples": 64}))
    return tmp_path


def _args(d, *extra):
    return ["--mm-model", str(d / "model.json"), "--mm-data", str(d / "data.json"), "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "2e-2", "--lr-warmup-fraction", "0.25", "--weight-decay", "0.01",
            "--clip-grad", "1.0", "--seed", "7", "--log-interval", "1", *extra]


def _run(argv):
    out = io.StringIO()
    losses = train(parse_args(argv), stream=out)
    return losses, out.getvalue()


def test_resume_matches_uninterrupted_run(toy_jsons):
    d = toy_jsons
    full, _ = _run(_args(d, "--train-iters", "8", "--save", str(d / "full")))
    first, _ = _run(_args(d, "--train-iters", "8", "--exit-interval", "4", "--save", str(d / "part")))
    assert mmc.latest_iteration(d / "part") == 4
    second, log = _run(_args(d, "--train-iters", "8", "--load", str(d / "part"), "--save", str(d / "part")))
    assert "iteration 4" in log
    assert len(first) == 4 and len(second) == 4
    # same data, optimizer moments, LR step and RNG: the CPU kernels are deterministic, so the
    # resumed losses equal the uninterrupted ones to fp32 round-off
    np.testing.assert_allclose(first + second, full, rtol=1e-6, atol=0)
    assert full[-1] < full[0]
    wa = mmc.load_model(d / "full")
    wb = mmc.load_model(d / "part")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7, err_msg=k)
    state = json.loads((d / "part" / "iter_0000008" / "train_state.json").read_text())
    assert state["iteration"] == 8 and state["consumed_samples"] == 32


def test_no_load_optim_changes_the_resumed_run(toy_jsons):
    """Guards the test above: resuming with a fresh optimizer must give different losses."""
    d = toy_jsons
    full, _ = _run(_args(d, "--train-iters", "6", "--save", str(d / "full")))
    _run(_args(d, "--train-iters", "6", "--exit-interval", "3", "--save", str(d / "part")))
    second, _ = _run(_args(d, "--train-iters", "6", "--load", str(d / "part"), "--no-load-optim"))
    assert len(second) == 3
    assert not np.allclose(second, full[3:], rtol=1e-6, atol=0)


def test_no_save_flags_leave_out_optimizer_and_rng(toy_jsons):
    d = toy_jsons
    _run(_args(d, "--train-iters", "2", "--save", str(d / "s"), "--no-save-optim", "--no-save-rng"))
    it = d / "s" / "iter_0000002"
    assert (it / "mp_rank_00" / "model.safetensors").is_file()
    assert (it / "train_state.json").is_file() and (it / "data_state.json").is_file()
    assert not (it / "optim.safetensors").exists() and not (it / "rng.json").exists()
    # resuming it without --no-load-optim is a clear error naming the missing file ...
    from ms_mm.training.checkpointing import TrainCheckpointError
    with pytest.raises(TrainCheckpointError, match="optim.safetensors"):
        _run(_args(d, "--train-iters", "4", "--load", str(d / "s")))
    # ... and works with the two --no-load-* switches
    losses, log = _run(_args(d, "--train-iters", "4", "--load", str(d / "s"), "--no-load-optim", "--no-load-rng"))
    assert len(losses) == 2 and "iteration 2" in log


def test_load_release_starts_at_iteration_zero(toy_jsons):
    """A converter output (release) gives the weights; training starts at iteration 0."""
    d = toy_jsons
    _run(_args(d, "--train-iters", "2", "--save", str(d / "s")))
    weights = mmc.load_model(d / "s")
    mmc.save_model(d / "rel", weights)           # what mm-convert hf_to_mm writes
    assert mmc.latest_iteration(d / "rel") == "release"
    losses, log = _run(_args(d, "--train-iters", "3", "--load", str(d / "rel")))
    assert len(losses) == 3 and "release" in log
    # the loaded (trained) weights fit better than a fresh init: the first loss is lower
    fresh, _ = _run(_args(d, "--train-iters", "1"))
    assert losses[0] < fresh[0]


def test_load_mismatched_checkpoint_names_the_tensor(toy_jsons):
    d = toy_jsons
    _run(_args(d, "--train-iters", "1", "--save", str(d / "s")))
    weights = mmc.load_model(d / "s")
    weights["text_decoder.mlp.weight"] = weights["text_decoder.mlp.weight"][:, :3]
    mmc.save_model(d / "bad", weights)
    from ms_mm.training.checkpointing import TrainCheckpointError
    with pytest.raises(TrainCheckpointError, match="text_decoder.mlp.weight"):
        _run(_args(d, "--train-iters", "1", "--load", str(d / "bad")))


def test_kill_during_save_keeps_previous_checkpoint(toy_jsons, tmp_path):
    d = toy_jsons
    save = d / "s"
    marker = tmp_path / "stalled"
    env = dict(os.environ, PYTHONPATH=str(REPO), MS_MM_TEST_STALL_IN_SAVE=f"4:{marker}")
    cmd = [sys.executable, "-m", "ms_mm.training.pretrain_vlm",
           *_args(d, "--train-iters", "6", "--save", str(save), "--save-interval", "2")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "training never reached the save of iteration 4"
            time.sleep(0.2)
        stage = Path(marker.read_text())
        # the kill happens inside the staged write: iteration 4's files exist, but only in staging
        assert (stage / "mp_rank_00" / "model.safetensors").is_file()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (save / mmc.LATEST_FILE).read_text().strip() == "2"
    assert not (save / "iter_0000004").exists()
    weights = mmc.load_model(save)               # follows latest -> iteration 2
    assert "text_decoder.mlp.weight" in weights
    assert stage.is_dir()                        # the killed save's staging is left behind ...
    losses, log = _run(_args(d, "--train-iters", "4", "--load", str(save), "--save", str(save)))
    assert "iteration 2" in log and len(losses) == 2
    assert not stage.exists() and "removed unfinished checkpoint staging" in log   # ... and cleaned
    assert mmc.latest_iteration(save) == 4


@pytest.mark.parametrize("model_id", ["qwen2_5vl", "deepseekvl2"])
def test_resume_from_a_chosen_iteration(tmp_path, model_id):
    """Tiny Qwen2.5-VL / DeepSeek-VL2 on their demo data (the real data loaders): train 4 iterations
    saving every 2, point latest_checkpointed_iteration.txt back at 2 (the guide's way to pick an
    iteration) and resume: iterations 3-4 repeat the first run's losses (and DeepSeek-VL2's CE / MoE
    aux losses and expert loads)."""
    from ms_mm.training.launch import prepare_embedded_default

    freeze = {"image_encoder": {"vision_encoder": {"freeze": False}, "vision_projector": {"freeze": False}},
              "text_decoder": {"freeze": False}}
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        emb = prepare_embedded_default(model_id, freeze, workdir=tmp_path)
    finally:
        os.chdir(old)
    save = tmp_path / "save"
    argv = ["--mm-model", emb["mm_model"], "--mm-data", emb["mm_data"], "--micro-batch-size", "2",
            "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "1", "--seed", "5",
            "--train-iters", "4", "--save", str(save), "--save-interval", "2", "--num-workers", "1",
            "--log-interval", "1"]
    full, full_log = _run(argv + ["--load", emb["load"]])
    assert mmc.latest_iteration(save) == 4 and (save / "iter_0000002").is_dir()
    (save / mmc.LATEST_FILE).write_text("2\n")
    resumed, log = _run(argv + ["--load", str(save)])
    assert "iteration 2" in log and len(resumed) == 2
    np.testing.assert_allclose(resumed, full[2:], rtol=1e-5)
    if model_id == "deepseekvl2":
        for name in ("ce loss", "moe aux loss", "expert load max/mean"):
            before, after = logged(full_log, name), logged(log, name)
            assert len(before) == 4 and len(after) == 2, (name, before, after)
            np.testing.assert_allclose(after, before[2:], rtol=1e-5, err_msg=name)

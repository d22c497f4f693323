"""The example finetune script on a machine without weights: the embedded default end to end.

`bash examples/mindspore/qwen2.5vl/finetune_qwen2_5_vl_7b.sh` in an empty working directory
must say once that the weights are absent, build the tiny Qwen2.5-VL (HF layout), convert it with
mm-convert, write the demo data, finetune it on CPU with a clearly falling loss, save a
checkpoint, and convert the result back to the HF layout with the trained weights.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from ms_mm.training import mm_checkpoint as mmc

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "mindspore" / "qwen2.5vl" / "finetune_qwen2_5_vl_7b.sh"


def _env(**extra):
    # the scripts call `python`: make it this interpreter even when the venv is not activated
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    env = dict(os.environ, MS_MM_DEVICE_TARGET="CPU", PATH=path)
    env.update(extra)
    env.pop("DRY_RUN", None)
    return env


def test_embedded_default_trains_and_converts_back(tmp_path):
    iters = 24
    res = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=_env(MS_MM_DEMO_ITERS=str(iters)),
                         capture_output=True, text=True, timeout=420)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    notes = [l for l in out.splitlines() if "not found: running the embedded default" in l]
    assert len(notes) == 1 and "ckpt/mm_path/Qwen2.5-VL-7B-Instruct" in notes[0]
    assert "mm-convert" in notes[0]
    # the log file the script tees holds the same run
    logs = list((tmp_path / "logs").glob("train_*.log"))
    assert len(logs) == 1 and "lm loss" in logs[0].read_text()

    losses = [float(m) for m in re.findall(r"lm loss: (\S+)", out)]
    assert len(losses) == iters
    first, last = np.mean(losses[:4]), np.mean(losses[-6:])
    assert last < 0.5 * first, (first, last, losses)

    save = tmp_path / "save_dir"
    assert mmc.latest_iteration(save) == iters
    trained = mmc.load_model(save)
    # the user's model_7b.json freezes the vision tower: it must not have moved
    release = mmc.load_model(tmp_path / "ckpt" / "mm_path" / "Qwen2.5-VL-tiny")
    for name in trained:
        frozen = name.startswith("image_encoder.")
        assert np.array_equal(trained[name], release[name]) == frozen, name

    # mm_to_hf ran on the result: reading the HF output back gives the trained weights
    from convert import load_hf_as_mm

    hf_out = tmp_path / "ckpt" / "mm_to_hf" / "Qwen2.5-VL-tiny"
    assert (hf_out / "config.json").is_file()
    _, back = load_hf_as_mm(str(hf_out), "qwen2_5_vl")
    assert back.keys() == trained.keys()
    for name in trained:
        np.testing.assert_array_equal(np.asarray(back[name], np.float32), trained[name], err_msg=name)


def test_unknown_flag_fails_before_anything_starts(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "unknown argument(s): --no-such-flag" in res.stdout + res.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "save_dir").exists()


def test_dry_run_hands_the_script_sizes_to_the_trainer_on_simulated_ranks(tmp_path, monkeypatch):
    """DRY_RUN=1: the 7b script's launcher argv (8 cards, TP 1, PP 4 split [1,10,10,7] / [32,0,0,0],
    bf16, seq 1024) becomes one trainer process per pipeline stage on simulated Ascend ranks: the same
    entry script, the script's sizes, 2 iterations, nothing loaded or saved, and each rank's DryRun
    environment. The processes are recorded, not started (test_dryrun_trainer.py runs them)."""
    from ms_mm.parallel import dryrun, fake_cann
    from ms_mm.training import launch
    from ms_mm.training.arguments import parse_args

    # a `python` shim first on PATH records the launcher's argv instead of running it
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    record = tmp_path / "argv.json"
    (shim_dir / "python").write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    (shim_dir / "python").chmod(0o755)
    env = _env(DRY_RUN="1")
    env["PATH"] = f"{shim_dir}{os.pathsep}{env['PATH']}"
    res = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    argv = json.loads(record.read_text())
    assert argv[:2] == ["-m", "ms_mm.training.launch"]

    started = []

    def fake_run_rank_processes(command, ranks, pc, workdir, **kw):
        out = []
        for rank in ranks:
            rank_dir = Path(workdir) / f"rank{rank}"
            rank_dir.mkdir(parents=True, exist_ok=True)
            rank_argv, rank_env = command(rank, rank_dir)
            started.append((rank, rank_argv, rank_env, pc))
            out.append(dryrun.RankResult(rank=rank, returncode=0, step_ok=True, used_peak_mb=1000,
                                         actual_peak_mb=2000, seconds=0.0, log_path=str(rank_dir / "train.log")))
        return out

    monkeypatch.setattr(dryrun, "run_rank_processes", fake_run_rank_processes)
    monkeypatch.setattr(fake_cann, "ensure_fake_cann", lambda: tmp_path / "fake_cann")
    for key in ("DRY_RUN_RANKS", "DRY_RUN_LEVEL", "RANK_ID", "RANK_SIZE", "MS_MM_DRY_RUN", "MS_MM_DRY_RUN_SEQ_LEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DRY_RUN", "1")
    monkeypatch.chdir(tmp_path)
    assert launch.main(argv[2:]) == 0

    # the first rank of each of the 4 stages of 2 ranks
    assert [rank for rank, *_ in started] == [0, 2, 4, 6]
    model_7b = SCRIPT.parent / "model_7b.json"
    for rank, rank_argv, rank_env, pc in started:
        assert rank_argv[:2] == [sys.executable, str(REPO / "ms_mm" / "training" / "pretrain_vlm.py")]
        args = parse_args(rank_argv[2:])
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 4)
        assert args.bf16 and args.micro_batch_size == 1 and args.global_batch_size == 48 * 2
        assert args.train_iters == 2 and args.log_interval == 1 and args.num_workers == 0
        assert args.load is None and args.save is None
        assert Path(args.mm_model) == model_7b.resolve() and Path(args.mm_model).is_absolute()
        assert Path(args.mm_data) == (SCRIPT.parent / "data_7b.json").resolve()
        assert "--seq-length" in rank_argv and rank_argv[rank_argv.index("--seq-length") + 1] == "1024"
        # the trainer's switch into DryRun, on one simulated Ascend rank of the world of 8
        assert rank_env["MS_MM_DRY_RUN"] == "1" and rank_env["MS_MM_DEVICE_TARGET"] == "Ascend"
        assert rank_env["MS_MM_DRY_RUN_SEQ_LEN"] == "1024"
        assert (rank_env["RANK_ID"], rank_env["RANK_SIZE"], rank_env["MS_SIMULATION_LEVEL"]) == (str(rank), "8", "1")
        assert str(tmp_path / "fake_cann") in rank_env["LD_LIBRARY_PATH"]
        assert not {"MS_WORKER_NUM", "WORLD_SIZE", "MS_NODE_RANK", "RANK", "LOCAL_RANK"} & set(rank_env)
        # the stage split the trainer will build: model_7b.json's pipeline_num_layers
        assert (pc.world_size, pc.tp, pc.pp, pc.dp) == (8, 1, 4, 2)
        assert list(pc.llm_pp_layers) == [1, 10, 10, 7] and list(pc.vit_pp_layers) == [32, 0, 0, 0]


def test_real_weights_path_checks_sizes_before_msrun(tmp_path):
    """With the weights present the script launches the real run; on CPU its --bf16 is refused with
    one clear line before msrun starts anything."""
    for d in ("ckpt/mm_path/Qwen2.5-VL-7B-Instruct", "ckpt/hf_path/Qwen2.5-VL-7B-Instruct"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "placeholder").write_text("x")
    res = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "--bf16 needs an Ascend device" in out
    assert "embedded default" not in out and "msrun" not in out.replace("msrun_log", "")
    assert not (tmp_path / "msrun_log").exists() and not (tmp_path / "save_dir").exists()

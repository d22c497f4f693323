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


def test_dry_run_hands_the_script_sizes_to_the_parallel_dryrun(tmp_path):
    """DRY_RUN=1: the 7b script's sizes (TP 1, PP 4 with [1,10,10,7] / [32,0,0,0], 8 cards, bf16, seq
    1024) reach `python -m ms_mm.parallel.dryrun`, whose own parser accepts them."""
    from ms_mm.parallel.dryrun import build_parser
    from ms_mm.training import launch

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
    cut = argv.index("--")
    ms_args = launch._msrun_parser().parse_args(argv[2:cut])
    from ms_mm.training.arguments import parse_args

    train_argv = argv[cut + 1:]
    args = parse_args(train_argv)
    model_json = json.loads(Path(args.mm_model).read_text())
    cmd = launch.dry_run_command(args, train_argv, model_json, ms_args.worker_num)
    assert cmd[1:3] == ["-m", "ms_mm.parallel.dryrun"]
    parsed = build_parser().parse_args(cmd[3:])
    assert (parsed.tp, parsed.pp, parsed.world_size) == (1, 4, 8)
    as_list = lambda v: json.loads(v) if isinstance(v, str) else v  # noqa: E731
    assert as_list(parsed.llm_pp_layers) == [1, 10, 10, 7]
    assert as_list(parsed.vit_pp_layers) == [32, 0, 0, 0]
    assert parsed.dtype == "bf16" and parsed.seq_len == 1024 and parsed.micro_batch_size == 1
    assert Path(parsed.mm_model).name == "model_7b.json"


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

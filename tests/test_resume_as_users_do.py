"""Resume after a stop, as users do it (issue 10, point 6): the quick start stopped at iteration 12
(`--exit-interval`, which saves on the way out; a crash leaves the last `--save-interval` checkpoint
the same way), then re-run the way users do — once with `--load save_dir` appended
(an explicit --load wins, also in the embedded default), once as it is (the checkpoint already in
SAVE_PATH is picked up: auto-resume) — continues from iteration 12 instead of restarting from the
converted release; `--no-auto-resume` starts over; another family's checkpoint is never resumed."""
import io
import json
import re
import subprocess

from test_launch import SCRIPT, _env

from ms_mm.training import mm_checkpoint as mmc
from ms_mm.training.arguments import parse_args
from ms_mm.training.launch import explicit_load


def _iterations(out):
    return [int(m) for m in re.findall(r"iteration\s+(\d+)/", out)]


def test_explicit_load_is_the_one_appended_to_the_script(tmp_path):
    ck = tmp_path / "save_dir"
    ck.mkdir()
    assert explicit_load(["--load", "ckpt/x", "--save", "s"]) is None           # the script's own only
    assert explicit_load(["--load", "ckpt/x", "--load", str(ck)]) is None        # not a checkpoint (yet)
    (ck / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert explicit_load(["--load", "ckpt/x", "--load", str(ck)]) == str(ck)
    assert explicit_load(["--load", "ckpt/x", f"--load={ck}"]) == str(ck)


def test_quick_start_rerun_continues_from_its_checkpoint(tmp_path):
    env = _env(MS_MM_DEMO_ITERS="14")
    first = subprocess.run(["bash", str(SCRIPT), "--save-interval", "10", "--exit-interval", "12",
                            "--log-interval", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert max(_iterations(first.stdout)) == 12 and mmc.latest_iteration(tmp_path / "save_dir") == 12

    again = subprocess.run(["bash", str(SCRIPT), "--save-interval", "10", "--log-interval", "1",
                            "--load", "save_dir"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "release" not in "\n".join(l for l in again.stdout.splitlines() if l.startswith("loaded") or "loaded " in l)
    assert "loaded save_dir: iteration 12" in again.stdout and min(_iterations(again.stdout)) == 13
    assert max(_iterations(again.stdout)) == 14


def test_auto_resume_is_the_default_and_can_be_turned_off(tmp_path):
    from ms_mm.training.trainer import train

    model = {"model_id": "toy_vlm", "image_encoder": {"vision_encoder": {"freeze": False},
                                                      "vision_projector": {"freeze": False}},
             "text_decoder": {"freeze": False}}
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "data.json").write_text(json.dumps({"num_samples": 64}))
    base = ["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"), "--lr", "1e-2",
            "--save", str(tmp_path / "save"), "--save-interval", "4", "--log-interval", "1"]
    out = io.StringIO()
    full = train(parse_args(base + ["--train-iters", "8"]), stream=out)
    log = io.StringIO()
    resumed = train(parse_args(base + ["--train-iters", "12"]), stream=log)
    assert "--save already holds iteration 8" in log.getvalue() and len(resumed) == 4
    fresh = train(parse_args(base + ["--train-iters", "3", "--no-auto-resume"]), stream=io.StringIO())
    assert len(fresh) == 3 and abs(fresh[0] - full[0]) < 1e-6          # started over: the first loss again

    # another family's checkpoint in --save is said and not resumed
    latest = mmc.latest_iteration(tmp_path / "save")
    layout = mmc.iteration_dir(tmp_path / "save", latest) / "parallel_layout.json"
    data = json.loads(layout.read_text())
    data["family"] = "some_other_family"
    layout.write_text(json.dumps(data))
    note = io.StringIO()
    other = train(parse_args(base + ["--train-iters", "2"]), stream=note)
    assert len(other) == 2 and f"holds a some_other_family checkpoint (iteration {latest}), not toy_vlm" in note.getvalue()

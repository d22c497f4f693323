"""Lumina-mGPT 2.0 training on extracted features, end to end through the example script.

* `bash examples/mindspore/lumina/mgpt2/pretrain.sh` in an empty directory runs the embedded default:
  one line says LOAD_PATH is absent, the tiny decoder is built and converted with LuminaConverter,
  the bundled demo images are turned into features (tiny MoVQGAN + bundled tokenizer), training on
  them logs the CE and z-loss beside the loss (loss = CE + z_loss_weight * z) and the loss falls
  clearly; `SAVE/model.json` is what the sampler reads, and sampling from the result writes a PNG;
* resuming from the saved iteration gives the uninterrupted run's losses (exact);
* length-grouped sampling: neighbouring lengths share a micro batch, every rank gets its share;
* bad features (truncated file, another tokenizer's layout, too long for the context) fail by name
  or are counted skips; `fsdp1` in model.json is one line on CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ms_mm.data.errors import BadSampleError
from training_logs import logged

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "mindspore" / "lumina" / "mgpt2" / "pretrain.sh"


def _env(**extra):
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    env = dict(os.environ, MS_MM_DEVICE_TARGET="CPU", PATH=path, GLOG_v="3")
    env.update(extra)
    env.pop("DRY_RUN", None)
    return env


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("lumina_embedded")
    res = subprocess.run(["bash", str(SCRIPT), "--save-interval", "20"], cwd=cwd, capture_output=True, text=True,
                         timeout=400, env=_env(MS_MM_DEMO_ITERS="40"))
    return cwd, res.returncode, res.stdout + res.stderr


def test_embedded_default_trains_on_features_and_samples(embedded_run):
    cwd, rc, out = embedded_run
    assert rc == 0, out[-4000:]
    notes = [l for l in out.splitlines() if "not found: running the embedded default" in l]
    assert len(notes) == 1 and "LOAD_PATH ./Lumina/Lumina-mGPT-2.0-mm-convert/" in notes[0], out[-3000:]
    assert "LuminaConverter hf_to_mm" in out and "LuminaConverter mm_to_hf" in out
    loss, ce, z = logged(out, "lm loss")[:, 0], logged(out, "ce loss")[:, 0], logged(out, "z loss")[:, 0]
    assert len(loss) == 40
    np.testing.assert_allclose(loss, ce + 1e-5 * z, rtol=1e-4)          # z_loss_weight of the tiny config
    assert loss[-5:].mean() < 0.6 * loss[:3].mean(), loss                # falls clearly
    saved = json.loads((cwd / "lumina_mgpt2_ckpt" / "model.json").read_text())
    assert saved["model_id"] == "lumina" and Path(saved["movqgan_path"]).is_dir()
    res = subprocess.run([sys.executable, "-m", "ms_mm.models.lumina_mgpt2.sample", "--load", "lumina_mgpt2_ckpt",
                          "--prompt", "A red circle in the top left on a white background.", "--out", "img.png",
                          "--width", "32", "--height", "32"], cwd=cwd, capture_output=True, text=True, timeout=200,
                         env=_env(PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stdout + res.stderr
    from PIL import Image

    with Image.open(cwd / "img.png") as im:
        assert im.format == "PNG" and im.size == (32, 32)


def _train(cwd, data_json, model_json, *extra):
    cmd = [sys.executable, "-m", "ms_mm.training.pretrain_vlm", "--mm-model", str(model_json), "--mm-data",
           str(data_json), "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
           "--num-workers", "0", "--log-interval", "1", *extra]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=_env(PYTHONPATH=str(REPO)))
    return res.returncode, res.stdout + res.stderr


def test_resume_gives_the_uninterrupted_losses(embedded_run, tmp_path):
    """The embedded run's own trainer command (without the guide's --no-save-optim / --no-load-*
    switches: exact resume needs the optimizer and RNG state) for 4 iterations saving at 2 and 4;
    resumed from iteration 2 it logs iterations 3 and 4 exactly as the uninterrupted run."""
    import shlex
    import shutil

    cwd, rc, out = embedded_run
    assert rc == 0
    cmd = shlex.split(next(l for l in out.splitlines() if l.startswith("[ms-mm] ") and "pretrain_vlm.py" in l)[8:])
    cmd = [c for c in cmd if c not in ("--no-load-optim", "--no-load-rng", "--no-save-optim", "--no-save-rng")]
    full = tmp_path / "full"

    def run(load, save, *extra):
        c = list(cmd)
        for flag, value in (("--load", load), ("--save", save), ("--train-iters", 4), ("--save-interval", 2),
                            ("--log-interval", 1)):
            for i in [i for i, a in enumerate(c) if a == flag]:    # every occurrence (the last one wins)
                c[i + 1] = str(value)
        res = subprocess.run(c + list(extra), cwd=cwd, capture_output=True, text=True, timeout=300,
                             env=_env(PYTHONPATH=str(REPO)))
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        return res.stdout + res.stderr

    first = run(cmd[cmd.index("--load") + 1], full)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full, resumed_dir)
    shutil.rmtree(resumed_dir / "iter_0000004")
    (resumed_dir / "latest_checkpointed_iteration.txt").write_text("2")
    second = run(resumed_dir, resumed_dir)
    assert "iteration 2" in second
    for name in ("lm loss", "z loss", "grad norm"):
        np.testing.assert_array_equal(logged(first, name)[2:, 0], logged(second, name)[:, 0])


def test_fsdp1_is_refused_on_cpu_with_one_line(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"model_id": "lumina", "preset": "tiny", "fsdp1": {}}))
    (tmp_path / "data.json").write_text(json.dumps({"dataset_param": {"dataset_type": "lumina"}}))
    rc, out = _train(tmp_path, tmp_path / "data.json", tmp_path / "model.json")
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "fsdp1" in errors[0] and "CPU" in errors[0], out[-2000:]
    assert "Traceback" not in out


def test_length_grouped_shard():
    from ms_mm.models.lumina_mgpt2.processing import length_grouped_shard

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=103)
    shards = [length_grouped_shard(lengths, 1, 7, r, 2, 4) for r in range(2)]
    assert all(len(s) == 103 // 2 for s in shards)
    both = np.concatenate(shards)
    assert len(set(both.tolist())) == len(both)                       # no record twice in an epoch
    # each global micro batch (4 per rank x 2 ranks) holds neighbouring lengths: its spread is far
    # below a random batch's
    spreads = [np.ptp(np.concatenate([lengths[s[i:i + 4]] for s in shards])) for i in range(0, 48, 4)]
    assert np.mean(spreads) < 0.1 * np.ptp(lengths)
    assert not np.array_equal(shards[0], length_grouped_shard(lengths, 2, 7, 0, 2, 4))   # reshuffled per epoch


def test_bad_feature_files_fail_by_name_or_are_skipped(tmp_path):
    from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config
    from ms_mm.models.lumina_mgpt2.processing import (
        FeatureMismatch, LuminaFeatureDataset, build_lumina_dataloader, layout_vector, write_feature)

    config = LuminaMGPT2Config.preset("tiny")
    tok = config.tokens
    codes = np.arange(16).reshape(4, 4) % tok.codebook_size
    from ms_mm.models.lumina_mgpt2.inputs import t2i_sequence

    ids, labels = t2i_sequence([5, 6, 7], codes, tok, config.bos_token_id)
    good = layout_vector(tok, config.vocab_size)
    other = good.copy()
    other[2] = 16384                                                     # codebook_size of another tokenizer
    (tmp_path / "files").mkdir()
    recs = []
    for i, layout in enumerate([good, other, good, good, good, good]):
        write_feature(tmp_path / "files" / f"{i}.npz", ids, labels, i, layout, (1, 1))
        recs.append({"file": f"files/{i}.npz", "len": len(ids), "id": i})
    raw = (tmp_path / "files" / "2.npz").read_bytes()
    (tmp_path / "files" / "2.npz").write_bytes(raw[:len(raw) // 2])   # truncated
    long_ids = ids + [5] * (config.max_position_embeddings)
    write_feature(tmp_path / "files" / "3.npz", long_ids, long_ids, 3, good, (1, 1))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = LuminaFeatureDataset(tmp_path / "data.jsonl", config)
    assert ds[0]["input_ids"].tolist() == ids
    with pytest.raises(FeatureMismatch, match=r"1\.npz.*codebook_size 16384 \(model: 64\)"):
        ds[1]
    with pytest.raises(BadSampleError, match=r"2\.npz.*truncated or corrupt"):
        ds[2]
    with pytest.raises(BadSampleError, match=r"3\.npz.*more than the model's context"):
        ds[3]
    cfg = {"dataset_param": {"dataset_type": "lumina", "basic_parameters": {"data_config": {
        "path": str(tmp_path / "data.jsonl")}}, "preprocess_parameters": {"item_processor_type":
        "LoadFeatureItemProcessor"}}, "dataloader_param": {"shuffle": False, "group_by_length": False}}
    loader = build_lumina_dataloader(cfg, config, micro_batch_size=2, num_workers=0, skip_bad_samples=True,
                                     num_epochs=1)
    batches = list(loader)
    assert len(batches) == 1 and loader.skipped == 3
    loader = build_lumina_dataloader(cfg, config, micro_batch_size=2, num_workers=0, num_epochs=1)
    with pytest.raises(FeatureMismatch, match=r"1\.npz"):
        next(loader)

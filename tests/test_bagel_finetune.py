"""BAGEL finetuning through the project's trainer on the embedded default (tiny BAGEL in the release
layout, converted; the bundled demo data of all three kinds): the upstream log line, falling losses,
the EMA saved as `ema/` beside the model, exact resume (losses and EMA), `--auto_resume`,
`--resume-model-only --finetune-from-ema` and the family's own `--visual_gen` flag."""
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from ms_mm.training.arguments import ArgumentError, parse_args
from ms_mm.training.launch import prepare_embedded_default
from ms_mm.training.mm_checkpoint import load_model
from ms_mm.training.trainer import train

LINE = re.compile(r"\(step=(\d{7})\) Train Loss mse: (\d+\.\d{4}), Train Loss ce: (\d+\.\d{4}), "
                  r"Train Steps/Sec: \d+\.\d\d, Packing Efficiency: (0\.\d{3}|1\.000)")


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    work = tmp_path_factory.mktemp("bagel_emb")
    return prepare_embedded_default("bagel", {}, work), work


def _run(emb, *extra):
    e, _ = emb
    argv = ["--load", e["load"], "--mm-model", e["mm_model"], "--mm-data", e["mm_data"], "--micro-batch-size", "1",
            "--lr", "2e-3", "--lr-decay-style", "constant", "--clip-grad", "1.0", "--log-interval", "1",
            "--ema", "0.9", *extra]
    out = io.StringIO()
    losses = train(parse_args(argv), stream=out)
    return losses, out.getvalue()


def test_finetune_resume_ema_and_recipe_flags(emb, tmp_path):
    e, work = emb
    save = tmp_path / "save"
    losses, log = _run(emb, "--train-iters", "6", "--save", str(save), "--save-interval", "3",
                       "--tensorboard-dir", str(tmp_path / "tb"))
    lines = LINE.findall(log)
    assert [int(s) for s, *_ in lines] == list(range(1, 7)), log[-2000:]
    ce = [float(c) for _, _, c, _ in lines]
    mse = [float(m) for _, m, _, _ in lines]
    assert all(c > 0 for c in ce) and all(m > 0 for m in mse)
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    assert "lm loss:" in log and "ce loss:" in log and "packing efficiency:" in log   # beside the Megatron fields
    assert list((tmp_path / "tb").iterdir()), "no TensorBoard events written"
    # EMA beside the model in every checkpoint; frozen VAE weights equal, trained weights differ
    for it in (3, 6):
        model = load_model(str(save / f"iter_{it:07d}"), float32=True)
        ema = load_model(str(save / f"iter_{it:07d}" / "ema"), float32=True)
        assert sorted(model) == sorted(ema)
        vae = [k for k in model if k.startswith("vae.")]
        assert vae and all(np.array_equal(model[k], ema[k]) for k in vae)
        assert not np.allclose(model["llm2vae.weight"], ema["llm2vae.weight"])

    # exact resume from iteration 3 (--auto_resume picks the latest checkpoint of --save)
    resumed = tmp_path / "resumed"
    shutil.copytree(save, resumed)
    shutil.rmtree(resumed / "iter_0000006")
    (resumed / "latest_checkpointed_iteration.txt").write_text("3")
    e2 = dict(e)
    e2["load"] = str(work / "does-not-exist")       # auto-resume must not need --load
    again, log2 = _run((e2, work), "--train-iters", "6", "--save", str(resumed), "--auto_resume", "True",
                       "--save-interval", "3")
    assert "--auto_resume: resuming from the latest checkpoint" in log2 and "(restored)" in log2
    np.testing.assert_allclose(again, losses[3:], rtol=1e-5, atol=1e-6)
    ema_a = load_model(str(save / "iter_0000006" / "ema"), float32=True)
    ema_b = load_model(str(resumed / "iter_0000006" / "ema"), float32=True)
    for k in ema_a:
        np.testing.assert_allclose(ema_b[k], ema_a[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # --resume-model-only --finetune-from-ema starts from the EMA weights; --visual_gen False trains
    # understanding only (no MSE tokens)
    ft, log3 = _run(emb, "--load", str(save), "--resume-model-only", "True", "--finetune-from-ema", "True",
                    "--train-iters", "2", "--visual_gen", "False")
    assert f"(weights from {save / 'iter_0000006' / 'ema'})" in log3
    assert all(float(m) == 0.0 and float(c) > 0 for _, m, c, _ in LINE.findall(log3))


def test_recipe_flags_and_refusals(emb):
    e, _ = emb
    args = parse_args(["--total_steps", "5", "--warmup_steps", "2", "--save_every", "5", "--log_every", "2",
                       "--num_worker", "1", "--checkpoint_dir", "ck", "--results_dir", "res", "--visual_und", "True",
                       "--max_num_tokens", "256"])
    assert (args.train_iters, args.lr_warmup_iters, args.save_interval, args.log_interval, args.num_workers,
            args.save, args.tensorboard_dir) == (5, 2, 5, 2, 1, "ck", "res")
    assert args.family_argv == ["--visual_und", "True", "--max_num_tokens", "256"]
    base = ["--mm-model", e["mm_model"], "--mm-data", e["mm_data"], "--load", e["load"], "--train-iters", "1"]
    with pytest.raises(ArgumentError, match=r"--use-torch-fsdp2 shards parameters .* needs Ascend with more than one "
                                            r"card, here CPU x 1: remove it"):
        train(parse_args(base + ["--use-torch-fsdp2"]), stream=io.StringIO())
    with pytest.raises(ArgumentError, match=r"--micro-batch-size 2: a BAGEL micro batch is one packed sequence"):
        train(parse_args(base + ["--micro-batch-size", "2"]), stream=io.StringIO())
    qwen_json = Path(e["mm_model"]).with_name("qwen.json")
    qwen_json.write_text(json.dumps({"model_id": "qwen2_5vl", "preset": "tiny"}))
    with pytest.raises(ArgumentError, match=r"--visual_gen is not a flag of model family qwen2_5_vl"):
        train(parse_args(["--mm-model", str(qwen_json), "--mm-data", e["mm_data"], "--visual_gen", "False"]),
              stream=io.StringIO())


def test_freeze_und_flag_keeps_the_und_weights(emb, tmp_path):
    """--freeze_und (upstream's flag) through the trainer: the und weights, the ViT, the connector and the
    text embedding come out as loaded (zero gradients, AdamW without weight decay leaves them), the gen
    copies and lm_head train."""
    e, _ = emb
    save = tmp_path / "save"
    _run(emb, "--train-iters", "2", "--save", str(save), "--save-interval", "2", "--freeze_und", "True")
    before = load_model(e["load"], float32=True)
    after = load_model(str(save / "iter_0000002"), float32=True)
    und = [k for k in after if k.startswith("image_encoder.") or
           (k.startswith("text_decoder.") and "_moe_gen" not in k and "output_layer" not in k)]
    assert len(und) > 20
    moved = [k for k in und if not np.array_equal(before[k], after[k])]
    assert not moved, moved
    for k in ("text_decoder.output_layer.weight", "llm2vae.weight",
              "text_decoder.decoder.layers.0.self_attention.linear_qkv_moe_gen.weight"):
        assert not np.array_equal(before[k], after[k]), k

"""Training engine: flags, model-json reading, freezing, accumulation, fp16 scaling, logging.

Engine behaviour is checked on the toy family (same code paths, compiles in seconds); the
Qwen2.5-VL model-json reader is checked against the released presets.
"""
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from ms_mm.training.arguments import ArgumentError, parse_args
from ms_mm.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "mindspore" / "qwen2.5vl"

UPSTREAM_7B_FLAGS = """
    --use-mcore-models --tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 --context-parallel-size 1
    --context-parallel-algo ulysses_cp_algo --micro-batch-size 1 --global-batch-size 96 --tokenizer-type NullTokenizer
    --vocab-size 152064 --seq-length 1024 --make-vocab-size-divisible-by 1 --normalization RMSNorm
    --use-fused-rmsnorm --swiglu --use-fused-swiglu --lr 1.0e-5 --lr-decay-style cosine --weight-decay 0
    --train-iters 10000 --lr-warmup-fraction 0.1 --clip-grad 0.0 --adam-beta1 0.9 --adam-beta2 0.999 --seed 42
    --bf16 --load ckpt/mm_path/Qwen2.5-VL-7B-Instruct --use-flash-attn --variable-seq-lengths
    --use-distributed-optimizer --no-load-optim --no-load-rng --no-save-optim --no-save-rng --num-workers 8
    --mm-data d.json --mm-model m.json --mm-tool ./mindspeed_mm/tools/tools.json --log-interval 1
    --save-interval 10000 --eval-interval 10000 --eval-iters 5000 --save save_dir --ckpt-format torch --log-tps
    --distributed-backend nccl --ai-framework mindspore
""".split()


# --- flags ----------------------------------------------------------------------------------------

def test_upstream_script_flags_parse():
    args = parse_args(UPSTREAM_7B_FLAGS)
    assert (args.micro_batch_size, args.global_batch_size, args.train_iters) == (1, 96, 10000)
    assert args.lr == 1e-5 and args.lr_warmup_fraction == 0.1 and args.clip_grad == 0.0
    assert args.no_load_optim and args.no_load_rng and args.no_save_optim and args.no_save_rng
    assert args.bf16 and args.log_tps and args.pipeline_model_parallel_size == 4
    assert "--use-flash-attn" in args.ignored_flags and "--mm-tool" in args.ignored_flags
    assert "--lr" not in args.ignored_flags


def test_unknown_flag_is_named():
    with pytest.raises(ArgumentError, match="--no-such-flag"):
        parse_args(["--mm-model", "m", "--mm-data", "d", "--no-such-flag", "3"])


def test_world_size_must_divide_by_tp_pp():
    args = parse_args(["--mm-model", "m", "--mm-data", "d", "--tensor-model-parallel-size", "2",
                       "--pipeline-model-parallel-size", "4"])
    with pytest.raises(ArgumentError, match=r"WORLD_SIZE=12 .*tensor-model-parallel-size \(2\).*"
                                            r"pipeline-model-parallel-size \(4\)"):
        args.validate(12, "Ascend")
    args.validate(16, "Ascend")
    assert args.data_parallel_size == 2


def test_expert_parallel_must_divide_dp():
    args = parse_args(["--mm-model", "m", "--mm-data", "d", "--expert-model-parallel-size", "3"])
    with pytest.raises(ArgumentError, match="expert-model-parallel-size \\(3\\)"):
        args.validate(8, "Ascend")


def test_global_batch_and_accumulation():
    args = parse_args(["--mm-model", "m", "--mm-data", "d", "--micro-batch-size", "2", "--global-batch-size", "12"])
    args.validate(3, "CPU")
    assert args.grad_accum_steps == 2
    bad = parse_args(["--mm-model", "m", "--mm-data", "d", "--micro-batch-size", "2", "--global-batch-size", "10"])
    with pytest.raises(ArgumentError, match="--global-batch-size 10"):
        bad.validate(3, "CPU")


def test_bf16_on_cpu_is_a_clear_error():
    args = parse_args(["--mm-model", "m", "--mm-data", "d", "--bf16"])
    with pytest.raises(ArgumentError, match="--bf16 needs an Ascend"):
        args.validate(1, "CPU")
    args.validate(1, "Ascend")


# --- model json (Qwen2.5-VL) ------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["3b", "7b", "32b", "72b"])
def test_example_model_json_matches_release_preset(size):
    from ms_mm.models.qwen2_5_vl import Qwen2_5_VLConfig
    from ms_mm.models.qwen2_5_vl.config import config_from_json as qwen2_5_vl_config_from_model_json

    mj = json.loads((EXAMPLES / f"model_{size}.json").read_text())
    assert qwen2_5_vl_config_from_model_json(mj) == Qwen2_5_VLConfig.preset(size)
    assert mj["image_encoder"]["vision_encoder"]["freeze"] is True
    assert mj["text_decoder"]["freeze"] is False


def test_example_scripts_pp_matches_model_json():
    for size in ("3b", "7b", "32b", "72b"):
        script = (EXAMPLES / f"finetune_qwen2_5_vl_{size}.sh").read_text()
        pp = int(re.search(r"^PP=(\d+)", script, re.M).group(1))
        mj = json.loads((EXAMPLES / f"model_{size}.json").read_text())
        assert len(mj["text_decoder"]["pipeline_num_layers"]) == pp, size
        assert len(mj["image_encoder"]["vision_encoder"]["pipeline_num_layers"]) == pp, size


def test_model_json_pipeline_layers_must_sum():
    from ms_mm.models.qwen2_5_vl.config import config_from_json as qwen2_5_vl_config_from_model_json

    mj = json.loads((EXAMPLES / "model_7b.json").read_text())
    mj["text_decoder"]["pipeline_num_layers"] = [1, 10, 10, 6]
    with pytest.raises(ValueError, match=r"text_decoder.pipeline_num_layers \[1, 10, 10, 6\] sums to 27"):
        qwen2_5_vl_config_from_model_json(mj)


# --- engine on the toy family ---------------------------------------------------------------------

def _toy(tmp_path, freeze=(False, False, False), **extra):
    model = {"model_id": "toy_vlm",
             "image_encoder": {"vision_encoder": {"freeze": freeze[0]}, "vision_projector": {"freeze": freeze[1]}},
             "text_decoder": {"freeze": freeze[2]}, **extra}
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "data.json").write_text(json.dumps({"num_samples": 128}))
    return ["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"),
            "--lr", "3e-2", "--seed", "1", "--log-interval", "1"]


def _train(argv):
    out = io.StringIO()
    return train(parse_args(argv), stream=out), out.getvalue()


def test_loss_falls_and_log_lines(tmp_path):
    losses, log = _train(_toy(tmp_path) + ["--micro-batch-size", "4", "--train-iters", "30", "--log-tps",
                                           "--lr-warmup-fraction", "0.1", "--min-lr", "1e-4"])
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    lines = [l for l in log.splitlines() if "iteration " in l and "lm loss" in l]
    assert len(lines) == 30
    # MindSpeed-MM's scripts read the step time as the 5th ':'-separated field
    assert float(lines[-1].split(":")[4].split("|")[0]) > 0
    assert "tokens per sample: 16.0" in lines[-1]           # toy samples have 16 tokens
    logged = [float(re.search(r"lm loss: (\S+)", l).group(1)) for l in lines]
    np.testing.assert_allclose(logged, losses, rtol=1e-6)
    lrs = [float(re.search(r"learning rate: (\S+)", l).group(1)) for l in lines]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-2) and lrs[-1] < 3e-3   # warm-up, cosine decay
    assert "Average Samples per Second" in log and "Consumed Tokens per Second" in log


def test_freeze_switches(tmp_path):
    from ms_mm.training import mm_checkpoint as mmc

    from ms_mm.models.toy_vlm.modeling import ToyConfig, build_toy_model

    before = {p.name: p.asnumpy() for p in build_toy_model(ToyConfig()).get_parameters()}  # deterministic init
    argv = _toy(tmp_path, freeze=(True, True, False)) + ["--train-iters", "3"]
    _, log = _train(argv + ["--save", str(tmp_path / "after")])
    assert "freezing image_encoder.vision_encoder" in log and "freezing image_encoder.vision_projector" in log
    after = mmc.load_model(tmp_path / "after")
    for name in before:
        same = np.array_equal(before[name], after[name])
        assert same == name.startswith("image_encoder."), name
    optim = mmc.read_safetensors(tmp_path / "after" / "iter_0000003" / "optim.safetensors")
    assert not any("image_encoder" in k for k in optim) and any("text_decoder" in k for k in optim)


def test_freezing_everything_is_an_error(tmp_path):
    with pytest.raises(ArgumentError, match="freezes every parameter group"):
        _train(_toy(tmp_path, freeze=(True, True, True)) + ["--train-iters", "1"])


def test_gradient_accumulation_equals_large_micro_batch(tmp_path):
    base = _toy(tmp_path) + ["--train-iters", "4", "--global-batch-size", "8"]
    big, _ = _train(base + ["--micro-batch-size", "8"])
    accum, log = _train(base + ["--micro-batch-size", "2"])
    assert "gradient accumulation 4" in log
    # same samples; the toy loss is a mean over equally many tokens per micro-batch
    np.testing.assert_allclose(accum, big, rtol=2e-5)


def test_fp16_dynamic_loss_scaling(tmp_path):
    losses, log = _train(_toy(tmp_path) + ["--micro-batch-size", "4", "--train-iters", "12", "--fp16",
                                           "--initial-loss-scale", "65536", "--loss-scale-window", "4"])
    assert "precision fp16" in log
    scales = [float(x) for x in re.findall(r"loss scale: (\S+)", log)]
    assert len(scales) == 12 and all(np.isfinite(losses))
    # 4 clean steps in a row double the scale (window 4), so the scale changes during the run
    assert len(set(scales)) > 1
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_tensorboard_scalars(tmp_path):
    tb = tmp_path / "tb"
    _train(_toy(tmp_path) + ["--train-iters", "3", "--tensorboard-dir", str(tb)])
    events = list(tb.glob("events.out.tfevents.*"))
    assert events
    from tensorboardX.proto import event_pb2

    import struct
    tags = set()
    data = events[0].read_bytes()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        ev = event_pb2.Event()
        ev.ParseFromString(data[pos + 12:pos + 12 + n])
        tags |= {v.tag for v in ev.summary.value}
        pos += 12 + n + 4
    assert {"lm-loss", "learning-rate", "grad-norm", "samples-per-second"} <= tags


def test_bad_model_json_names_the_file(tmp_path):
    (tmp_path / "model.json").write_text('{"model_id": "toy_vlm",\n "vocab_size": }')
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(ArgumentError, match=r"model.json: invalid JSON at line 2"):
        _train(["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json")])
    (tmp_path / "model.json").write_text('{"model_id": "nope"}')
    with pytest.raises(ArgumentError, match="model_id 'nope' is not a known model family"):
        _train(["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json")])


def test_deepseek_vl2_family_trains_through_the_same_engine(tmp_path):
    """The engine is model-agnostic: DeepSeek-VL2 (tiny preset, MoE) plugs in by model_id, with the
    same freeze switches and checkpoint layout."""
    from ms_mm.models.deepseek_vl2.demo import demo_data_config, make_demo_dataset
    from ms_mm.training import mm_checkpoint as mmc

    make_demo_dataset(tmp_path / "data", n=8, seed=2)
    (tmp_path / "data.json").write_text(json.dumps(demo_data_config(tmp_path / "data")))
    (tmp_path / "model.json").write_text(json.dumps(
        {"model_id": "deepseekvl2", "preset": "tiny", "image_encoder": {"vision_encoder": {"freeze": True}}}))
    argv = ["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"),
            "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--num-workers", "1"]
    _train(argv + ["--save", str(tmp_path / "init"), "--exit-interval", "1", "--lr", "0"])
    losses, log = _train(argv + ["--save", str(tmp_path / "s")])
    assert "family deepseek_vl2" in log and all(np.isfinite(losses))
    state = json.loads((tmp_path / "s" / "iter_0000002" / "train_state.json").read_text())
    assert state["family"] == "deepseek_vl2"
    before, after = mmc.load_model(tmp_path / "init"), mmc.load_model(tmp_path / "s")
    assert any(not np.array_equal(before[k], after[k]) for k in after if k.startswith("text_decoder."))
    for k in after:
        if k.startswith("image_encoder.encoder."):
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def _demo_run_with_missing_images(tmp_path, bad_indices, shuffle=True):
    """Tiny Qwen2.5-VL model json + demo data whose records at `bad_indices` point at a missing image."""
    from ms_mm.models.qwen2_5_vl.demo import demo_data_config, make_demo_dataset
    from ms_mm.models.qwen2_5_vl.tokenizer import asset_dir
    from ms_mm.models.qwen2_5_vl.config import mindspeed_model_json as qwen2_5_vl_model_json
    from ms_mm.models.qwen2_5_vl import Qwen2_5_VLConfig

    data_file = make_demo_dataset(tmp_path / "data", n=4, seed=0)
    records = json.loads(data_file.read_text())
    for i in bad_indices:
        records[i]["images"] = ["images/does_not_exist.png"] * len(records[i]["images"])
    data_file.write_text(json.dumps(records))
    data_cfg = demo_data_config(tmp_path / "data", processor_dir=asset_dir())
    data_cfg["dataloader_param"]["shuffle"] = shuffle
    (tmp_path / "data.json").write_text(json.dumps(data_cfg))
    special = json.loads((Path(asset_dir()) / "special_ids.json").read_text())
    cfg = Qwen2_5_VLConfig.preset("tiny")
    cfg.text.vocab_size = int(special.get("vocab_size") or special["tokenizer_size"])
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
              "vision_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        if k in special:
            setattr(cfg, k, special[k])
    (tmp_path / "model.json").write_text(json.dumps(qwen2_5_vl_model_json(cfg)))
    return ["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"), "--num-workers", "1"]


def test_bad_sample_stops_with_one_line_naming_it(tmp_path, capsys):
    """A record whose image is missing: without --skip-bad-samples the run stops with exit status 1
    and a message naming the data file."""
    from ms_mm.training.trainer import main

    argv = _demo_run_with_missing_images(tmp_path, bad_indices=range(4))
    rc = main(argv + ["--train-iters", "2"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "does_not_exist.png" in err and "--skip-bad-samples" in err


def test_skip_bad_samples_trains_on_and_reports_the_count(tmp_path, capsys):
    """With --skip-bad-samples the run finishes and its log says how many samples it skipped: records
    in file order [good, bad, good, bad], one sample per step, two steps -> exactly one skipped."""
    from ms_mm.training.trainer import main

    argv = _demo_run_with_missing_images(tmp_path, bad_indices=[1, 3], shuffle=False)
    rc = main(argv + ["--train-iters", "2", "--skip-bad-samples", "--micro-batch-size", "1",
                      "--global-batch-size", "1", "--log-interval", "1"])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert rc == 0, out
    lines = [l for l in out.splitlines() if "iteration" in l and "lm loss" in l]
    assert len(lines) == 2, out
    assert "skipped bad samples" not in lines[0]
    assert "skipped bad samples: 1" in lines[1]

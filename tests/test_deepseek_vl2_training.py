"""DeepSeek-VL2 finetuning end to end, and its one-line errors.

* `bash examples/mindspore/deepseekvl2/finetune_deepseekvl2.sh` in an empty directory runs the
  embedded default: one line says the weights are absent, the tiny DeepSeek-VL2 is built, converted
  with `mm-convert DeepSeekVLConverter hf_to_mm --cfg.trust_remote_code True`, finetuned on the demo
  data with a clearly falling loss, saved and converted back with mm_to_hf; the log line and
  TensorBoard carry the CE loss, the MoE aux loss and the expert load per MoE layer.
* The guide's other script paths run the same script; the example model.json is the released model.
* Bad input fails with one line: `<image>` tags vs images, unknown scoring function, an expert
  parallel size that does not divide the experts, a world size the parallel sizes do not divide.
(Resume and 2-worker data parallel: tests/test_resume.py, tests/test_data_parallel.py.)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ms_mm.training import mm_checkpoint as mmc
from ms_mm.models.deepseek_vl2.config import config_from_json as deepseek_vl2_config_from_model_json
from ms_mm.models.deepseek_vl2.config import mindspeed_model_json as deepseek_vl2_model_json
from ms_mm.models.deepseek_vl2.family import step_metrics as deepseek_vl2_step_metrics
from training_logs import logged

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO / "examples" / "mindspore" / "deepseekvl2"
SCRIPT = EXAMPLE_DIR / "finetune_deepseekvl2.sh"
GUIDE_SCRIPT = REPO / "examples" / "deepseekvl2" / "finetune_deepseekvl2.sh"
EXPERIMENTAL_SCRIPT = REPO / "examples" / "experimental" / "deepseekvl2" / "finetune_deepseekvl2.sh"


def _env(**extra):
    # the scripts call `python`: make it this interpreter even when the venv is not activated
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    env = dict(os.environ, MS_MM_DEVICE_TARGET="CPU", PATH=path)
    env.update(extra)
    env.pop("DRY_RUN", None)
    return env


def _bash(script, cwd, *args, timeout=120, **env):
    res = subprocess.run(["bash", str(script), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                         timeout=timeout)
    return res.returncode, res.stdout + res.stderr


# --- the embedded default --------------------------------------------------------------------------

def test_embedded_default_trains_logs_moe_metrics_and_converts_back(tmp_path):
    iters = 24
    rc, out = _bash(SCRIPT, tmp_path, "--tensorboard-dir", "tb", timeout=480, MS_MM_DEMO_ITERS=str(iters))
    assert rc == 0, out[-4000:]
    notes = [l for l in out.splitlines() if "not found: running the embedded default" in l]
    assert len(notes) == 1 and "LOAD_PATH ckpt/DeepSeekVL2" in notes[0]
    assert "mm-convert DeepSeekVLConverter hf_to_mm --cfg.trust_remote_code True" in notes[0]
    assert "DeepSeekVLConverter hf_to_mm" in out and "DeepSeekVLConverter mm_to_hf" in out

    # the loss falls clearly
    losses = logged(out, "lm loss")[:, 0]
    assert len(losses) == iters
    first, last = losses[:4].mean(), losses[-6:].mean()
    assert last < 0.5 * first, (first, last, losses)

    # the MoE numbers: total = CE + aux (the model's objective), one expert-load value per MoE layer
    hf_config = json.loads((tmp_path / "ckpt" / "hf_path" / "DeepSeekVL2-tiny" / "config.json").read_text())
    lang = hf_config["language_config"]
    n_moe = lang["num_hidden_layers"] - lang["first_k_dense_replace"]
    ce, aux = logged(out, "ce loss")[:, 0], logged(out, "moe aux loss")[:, 0]
    np.testing.assert_allclose(ce + aux, losses, rtol=1e-5, atol=1e-5)
    assert (aux > 0).all() and (aux < 0.1 * ce).all()
    load = logged(out, "expert load max/mean")
    assert load.shape == (iters, n_moe)
    # max/mean lies in [1, experts / top-k] (all tokens on k experts)
    assert (load >= 1.0).all() and (load <= lang["n_routed_experts"] / lang["num_experts_per_tok"]).all()
    cv = logged(out, "expert load cv")[:, 0]
    assert len(cv) == iters and (cv >= 0).all()

    # ... and the same numbers in TensorBoard
    scalars = _tensorboard_scalars(tmp_path / "tb")
    expected = {"lm-loss", "ce-loss", "moe-aux-loss", "expert-load-cv"} | {
        f"expert-load-max-over-mean/{i}" for i in range(n_moe)}
    assert expected <= scalars.keys(), sorted(scalars)
    np.testing.assert_allclose(scalars["ce-loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(scalars[f"expert-load-max-over-mean/{n_moe - 1}"], load[:, -1], rtol=1e-3)

    # saved, nothing frozen in model.json: every tensor moved but SigLIP's attention-pool head (in the
    # checkpoint, unused: upstream ignore_head); the routed experts are stacked tensors, moved as a whole
    save = tmp_path / "save_dir"
    assert mmc.latest_iteration(save) == iters
    trained = mmc.load_model(save)
    release = mmc.load_model(tmp_path / "ckpt" / "mm_path" / "DeepSeekVL2-tiny")
    assert trained.keys() == release.keys()
    unmoved = [n for n in trained if np.array_equal(trained[n], release[n])]
    assert not [n for n in unmoved if ".attn_pool." not in n], unmoved
    assert len(unmoved) < len(trained) // 4, unmoved

    # mm_to_hf ran on the result: reading the HF output back gives the trained weights
    from convert import load_hf_as_mm

    hf_out = tmp_path / "ckpt" / "mm_to_hf" / "DeepSeekVL2-tiny"
    assert (hf_out / "config.json").is_file()
    _, back = load_hf_as_mm(str(hf_out), "deepseek_vl2")
    assert back.keys() == trained.keys()
    for name in trained:
        np.testing.assert_array_equal(np.asarray(back[name], np.float32), trained[name], err_msg=name)


def _tensorboard_scalars(log_dir: Path) -> dict:
    """{tag: [values by step]} read with TensorBoard's own reader, in a child process: tensorboard's
    protobuf modules and MindSpore's cannot be imported into one process."""
    code = ("import json, sys\n"
            "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
            "acc = EventAccumulator(sys.argv[1]); acc.Reload()\n"
            "print(json.dumps({t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}))\n")
    res = subprocess.run([sys.executable, "-c", code, str(log_dir)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- scripts and jsons -----------------------------------------------------------------------------

def _recorded_launch(script, tmp_path, *args):
    """argv that `script` hands to `python -m ms_mm.training.launch` (a `python` shim records it)."""
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir(exist_ok=True)
    record = tmp_path / "argv.json"
    (shim_dir / "python").write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    (shim_dir / "python").chmod(0o755)
    env = _env()
    env["PATH"] = f"{shim_dir}{os.pathsep}{env['PATH']}"
    res = subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(record.read_text())


@pytest.mark.parametrize("script, data_json", [
    (SCRIPT, EXAMPLE_DIR / "data.json"),
    (GUIDE_SCRIPT, GUIDE_SCRIPT.parent / "data.json"),        # the guide edits this data.json
    (EXPERIMENTAL_SCRIPT, EXAMPLE_DIR / "data.json"),
])
def test_guide_script_paths_run_the_one_script(tmp_path, script, data_json):
    from ms_mm.training import launch
    from ms_mm.training.arguments import parse_args

    argv = _recorded_launch(script, tmp_path)
    assert argv[:2] == ["-m", "ms_mm.training.launch"]
    cut = argv.index("--")
    runner = launch._msrun_parser().parse_args(argv[2:cut])
    assert (runner.worker_num, runner.local_worker_num, runner.master_port, runner.node_rank) == (8, 8, 6000, 0)
    args = parse_args(argv[cut + 1:])
    assert Path(args.mm_data) == data_json and Path(args.mm_model) == EXAMPLE_DIR / "model.json"
    assert args.load == "ckpt/DeepSeekVL2" and args.save == "save_dir"
    assert args.expert_model_parallel_size == 8 and args.tensor_model_parallel_size == 1
    assert args.no_load_optim and args.no_load_rng and args.no_save_optim and args.no_save_rng
    assert args.log_interval == 1 and args.save_interval == 5000 and args.log_tps
    assert args.micro_batch_size == 1 and args.global_batch_size == 64 * 8


def test_example_model_json_is_the_released_deepseek_vl2():
    from ms_mm.models.deepseek_vl2 import DeepseekVL2Config

    config = deepseek_vl2_config_from_model_json(json.loads((EXAMPLE_DIR / "model.json").read_text()))
    assert config.to_dict() == DeepseekVL2Config.preset("Base").to_dict()


def test_model_json_writer_round_trips_a_custom_tower():
    from ms_mm.models.deepseek_vl2 import DeepseekVL2Config

    config = DeepseekVL2Config.preset("tiny")      # a 70 px, 32-wide SigLIP: no released tower
    model_json = json.loads(json.dumps(deepseek_vl2_model_json(config, freeze={"vision_encoder": True})))
    assert model_json["image_encoder"]["vision_encoder"]["freeze"] is True
    assert deepseek_vl2_config_from_model_json(model_json).to_dict() == config.to_dict()


# --- metrics ----------------------------------------------------------------------------------------

def test_step_metrics_count_real_tokens_per_expert():
    """2 MoE layers, 4 experts, top-2, 1 sample of 4 positions of which the last is padding."""
    from types import SimpleNamespace

    config = SimpleNamespace(language_config=SimpleNamespace(n_routed_experts=4))
    allowed = np.tril(np.ones((4, 4), bool))
    allowed[:, 3] = False                                  # key 3 is padding
    bias = np.where(allowed, 0.0, -1e30).astype(np.float32)[None, None]
    routing = np.array([
        [[0, 1], [0, 1], [0, 1], [2, 3]],                  # layer 1: real tokens load 3, 3, 0, 0
        [[0, 1], [2, 3], [1, 2], [3, 3]],                  # layer 2: real tokens load 1, 2, 2, 1
    ], np.int32)
    m = deepseek_vl2_step_metrics(config, (np.float32(2.5), np.array([0.25, 0.5], np.float32), routing),
                                  {"attention_bias": bias})
    assert m["ce loss"] == 2.5 and m["moe aux loss"] == 0.75
    # layer 1: counts (3,3,0,0), mean 1.5 -> max/mean 2, std 1.5 -> cv 1
    # layer 2: counts (1,2,2,1), mean 1.5 -> max/mean 4/3, std 0.5 -> cv 1/3
    np.testing.assert_allclose(m["expert load max/mean"], [2.0, 4 / 3])
    np.testing.assert_allclose(m["expert load cv"], (1 + 1 / 3) / 2)


# --- bad input: one line each ------------------------------------------------------------------------

def _error_lines(out):
    return [l for l in out.splitlines() if l.startswith("error:")]


def _with_weights(tmp_path):
    """Placeholders at the script's LOAD_PATH and data.json processor_path: the real-weights path."""
    for d in ("ckpt/DeepSeekVL2", "raw_ckpt/DeepSeekVL2"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "placeholder").write_text("x")


def test_expert_parallel_size_must_divide_the_experts(tmp_path):
    _with_weights(tmp_path)
    rc, out = _bash(SCRIPT, tmp_path, "--expert-model-parallel-size", "5")
    assert rc == 2, out
    errors = _error_lines(out)
    assert len(errors) == 1, out
    assert "--expert-model-parallel-size 5 does not divide the 72 routed experts" in errors[0]
    assert "model.json" in errors[0]
    assert not (tmp_path / "msrun_log").exists() and not (tmp_path / "save_dir").exists()


def test_world_size_must_divide_by_the_parallel_sizes(tmp_path):
    _with_weights(tmp_path)
    rc, out = _bash(SCRIPT, tmp_path, "--tensor-model-parallel-size", "3")
    assert rc == 2, out
    errors = _error_lines(out)
    assert len(errors) == 1, out
    assert "WORLD_SIZE=8 is not divisible by tensor-model-parallel-size (3)" in errors[0]
    assert not (tmp_path / "msrun_log").exists() and not (tmp_path / "save_dir").exists()


def test_unknown_scoring_function_is_named(tmp_path, capsys):
    from ms_mm.training.trainer import main

    model_json = json.loads((EXAMPLE_DIR / "model.json").read_text())
    model_json["text_decoder"]["moe_router_score_function"] = "relu"
    (tmp_path / "model.json").write_text(json.dumps(model_json))
    rc = main(["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(EXAMPLE_DIR / "data.json")])
    err = capsys.readouterr().err
    assert rc == 2
    errors = _error_lines(err)
    assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
    assert str(tmp_path / "model.json") in errors[0]
    assert "text_decoder.moe_router_score_function='relu'" in errors[0] and "'sigmoid'" in errors[0]


def test_image_count_not_matching_image_tags_is_one_line(tmp_path, capsys):
    """A record whose user turn has one `<image>` tag but two images stops training with one line
    naming the file and line (the bundled tokenizer + a model json of the matching tile size)."""
    from PIL import Image

    from ms_mm.models.deepseek_vl2.demo import demo_data_config
    from ms_mm.models.deepseek_vl2.tokenizer import asset_dir
    from ms_mm.models.deepseek_vl2 import DeepseekVL2Config
    from ms_mm.training.trainer import main

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    bad = {"conversations": [{"role": "<|User|>", "content": "<image>What colour?", "images": ["a.png", "a.png"]},
                             {"role": "<|Assistant|>", "content": "Red."}]}
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(dict(bad, id=i)) for i in range(4)) + "\n")
    data = demo_data_config(tmp_path)
    data["dataset_param"]["basic_parameters"]["data_path"] = str(tmp_path / "bad.jsonl")
    (tmp_path / "data.json").write_text(json.dumps(data))
    config = DeepseekVL2Config.preset("tiny")      # the bundled processor's 70 px tiles
    proc = json.loads((asset_dir() / "processor_config.json").read_text())
    assert proc["candidate_resolutions"] == config.candidate_resolutions
    (tmp_path / "model.json").write_text(json.dumps(deepseek_vl2_model_json(config)))
    rc = main(["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"),
               "--micro-batch-size", "2", "--train-iters", "1", "--num-workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1, err
    errors = _error_lines(err)
    assert len(errors) == 1, err
    assert "bad.jsonl:" in errors[0]
    assert "the conversation has 1 <image> tag(s) but 2 image" in errors[0]
    assert "--skip-bad-samples" in errors[0]


def test_upstream_script_moe_flags_are_accepted():
    """MindSpeed-MM's finetune_deepseekvl2.sh GPT_ARGS + MOE_ARGS (+ the MLA switches) parse; the
    MLA sizes are model.json's, so `--qk-rope-head-dim` is not taken from the command line."""
    from ms_mm.training.arguments import ArgumentError, parse_args

    flags = """--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --context-parallel-size 1
        --expert-model-parallel-size 8 --micro-batch-size 1 --global-batch-size 512 --seq-length 4096
        --tokenizer-type NullTokenizer --vocab-size 129280 --position-embedding-type rope --swiglu
        --no-masked-softmax-fusion --lr 4e-5 --min-lr 0.0 --train-iters 5000 --lr-decay-style cosine
        --weight-decay 0.05 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.999 --no-gradient-accumulation-fusion
        --use-distributed-optimizer --bf16 --load pretrained/DeepSeekVL --variable-seq-lengths
        --normalization RMSNorm --use-fused-rmsnorm --no-load-optim --no-load-rng --no-save-optim --no-save-rng
        --num-workers 4 --multi-head-latent-attention --qk-layernorm --moe-grouped-gemm
        --moe-permutation-async-comm --moe-token-dispatcher-type alltoall
        --use-fused-moe-token-permute-and-unpermute --mm-data d.json --mm-model m.json
        --log-interval 1 --save-interval 5000 --save save_dir""".split()
    args = parse_args(flags)
    assert args.expert_model_parallel_size == 8 and args.weight_decay == 0.05
    assert "--moe-grouped-gemm" in args.ignored_flags and "--multi-head-latent-attention" in args.ignored_flags
    with pytest.raises(ArgumentError, match="--qk-rope-head-dim"):
        parse_args(flags + ["--qk-rope-head-dim", "64"])

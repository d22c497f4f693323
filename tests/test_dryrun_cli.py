"""The DryRun CLI without compiling: model json forms, log parsing, and plans refused up front."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ms_mm.models.qwen2_5_vl import Qwen2_5_VLConfig
from ms_mm.parallel import ParallelConfig
from ms_mm.parallel.dryrun import explain_error, load_model_config, main, parse_peak_memory, synthetic_batch

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "ms_mm.parallel.dryrun", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_model_json_forms(tmp_path):
    tiny = Qwen2_5_VLConfig.preset("tiny")
    assert load_model_config("tiny") == tiny
    assert load_model_config(tiny.to_dict()) == tiny
    assert load_model_config({"mm_model": tiny.to_dict()}) == tiny
    over = load_model_config({"preset": "tiny", "text": {"num_key_value_heads": 4}, "note": "ignored"})
    assert over.text.num_key_value_heads == 4 and over.text.hidden_size == 64
    path = tmp_path / "model.json"
    path.write_text(json.dumps(tiny.to_dict()))
    assert load_model_config(str(path)) == tiny
    # MindSpeed-MM model json (Megatron names)
    mega = {"model_id": "qwen2_5vl", "img_context_token_id": 151655,
            "image_encoder": {"vision_encoder": {"num_layers": 32, "hidden_size": 1280, "num_attention_heads": 16,
                                                 "ffn_hidden_size": 3420, "model_id": "qwen2vit"},
                              "vision_projector": {"model_id": "lnmlp"}},
            "text_decoder": {"num_layers": 28, "hidden_size": 3584, "num_attention_heads": 28,
                             "num_query_groups": 4, "ffn_hidden_size": 18944, "vocab_size": 152064,
                             "untie_embeddings_and_output_weights": True, "rope_theta": 1000000.0}}
    assert load_model_config(mega) == Qwen2_5_VLConfig.preset("7b")
    # the example scripts' model jsons (MindSpeed-MM form) are the released configs
    for size in ("3b", "7b", "32b", "72b"):
        example = REPO / "examples" / "mindspore" / "qwen2.5vl" / f"model_{size}.json"
        assert load_model_config(str(example)) == Qwen2_5_VLConfig.preset(size)
    bad_act = json.loads((REPO / "examples" / "mindspore" / "qwen2.5vl" / "model_7b.json").read_text())
    bad_act["text_decoder"]["activation_func"] = "gelu"
    with pytest.raises(ValueError, match="text.hidden_act='gelu'"):
        load_model_config(bad_act)
    # HF config.json (routed through the converter's adapter)
    from adapters.qwen2_5_vl import config_from_hf
    hf_json = REPO / "tests" / "fixtures" / "qwen2_5_vl_shapes" / "gqa3_tied_batch2" / "hf" / "config.json"
    assert load_model_config(str(hf_json)) == config_from_hf(json.loads(hf_json.read_text()))
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        load_model_config(str(tmp_path / "no_such.json"))
    with pytest.raises(ValueError, match="unknown Qwen2.5-VL preset"):
        load_model_config("13b")


def test_parse_peak_memory_and_explain_errors():
    log = ("Device MOC memory size: 65536M\nUsed peak memory usage (without fragments): 1104M\n"
           "Actual peak memory usage (with fragments): 1136M\n")
    assert parse_peak_memory(log) == (1104, 1136)
    assert parse_peak_memory("nothing") == (None, None)
    pc = ParallelConfig(world_size=12, tp=3)
    ms_line = ("[ERROR] PARALLEL(1,python):[operator_info.cc:248] CheckStrategyByVector] MatMulInfo11: Input index 0, "
               "the strategy is ((3, 1),), shape is [8192, 4096], shape value 8192 at dim index 0 cannot be "
               "divisible by strategy value 3")
    assert explain_error("noise\n" + ms_line + "\nmore", pc) == (
        "ms-mm: tp=3 does not divide dim 0 (size 8192) of the [8192, 4096] input of MatMul; "
        "choose sizes that divide the model's heads / widths / batch")
    devices = "it requires 16 devices, but the device number of this stage is 8"
    assert "needs 16 devices per pipeline stage but only 8" in explain_error(devices, pc)
    assert explain_error("something else", pc) == ""


def test_synthetic_batch_shapes():
    config = Qwen2_5_VLConfig.preset("tiny")
    inputs = synthetic_batch(config, batch_size=2, seq_len=64)
    assert inputs["input_ids"].shape == (2, 64)
    n_image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    assert n_image_tokens == 2 * 16  # 4x4 merged tokens per sample: a quarter of 64
    assert inputs["pixel_values"].shape == (n_image_tokens * 4, config.vision.patch_dim)
    with pytest.raises(ValueError, match="too short"):
        synthetic_batch(config, 1, 2)


def test_cli_refuses_tp_not_dividing_world_size(tmp_path):
    out = _cli("--mm-model", "tiny", "--tp", "3", "--world-size", "8", "--seq-len", "64", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "world_size=8 is not divisible by tp*pp*cp = 3*1*1 = 3" in out.stderr


def test_cli_refuses_tp_not_dividing_kv_heads(capsys):
    assert main(["--mm-model", "tiny", "--tp", "4", "--world-size", "8", "--seq-len", "64"]) == 2
    assert ("tp=4 does not divide text.num_key_value_heads=2 (text_decoder.decoder.layers.*.self_attention."
            "linear_qkv.weight has shape [128, 64]") in capsys.readouterr().err


def test_cli_refuses_pp_layers_not_summing(capsys):
    assert main(["--mm-model", "tiny", "--pp", "2", "--llm-pp-layers", "[1,2]", "--world-size", "8"]) == 2
    assert "llm_pp_layers=[1, 2] sums to 3 layers but the model has 2" in capsys.readouterr().err


def test_default_ranks_one_per_stage():
    from ms_mm.parallel.dryrun import build_parser, default_ranks
    assert default_ranks(ParallelConfig(world_size=8, pp=4)) == [0, 2, 4, 6]
    assert default_ranks(ParallelConfig(world_size=8, tp=2)) == [0]
    assert default_ranks(ParallelConfig(world_size=4), "all") == [0, 1, 2, 3]
    args = build_parser().parse_args(["--mm-model", "7b", "--ranks", "0,5", "--tensor-model-parallel-size", "2"])
    assert (args.ranks, args.tp) == ([0, 5], 2)
    assert build_parser().parse_args(["--mm-model", "7b"]).ranks == "stages"

"""`mm-convert` as the guide types it, its error messages, the tiny-model builder, and the
converter's memory bound (peak RSS of a ~300 MB conversion, measured in a subprocess)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURE_ROOT
from convert.cli import main
from ms_mm.training.mm_checkpoint import read_safetensors

REPO = Path(__file__).resolve().parents[1]
HF = FIXTURE_ROOT / "qwen2_5_vl" / "forward" / "hf"


def cli(*args):
    return main([str(a) for a in args])


def test_guide_commands_round_trip(tmp_path, capsys):
    mm, back = tmp_path / "ckpt/mm_path/X", tmp_path / "ckpt/mm_to_hf/X"
    # hf_to_mm as in the guide: [[...]] lists, through the real console entry point
    r = subprocess.run([sys.executable, "-m", "convert.cli", "Qwen2_5_VLConverter", "hf_to_mm",
                        "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir", str(HF),
                        "--cfg.parallel_config.llm_pp_layers", "[[1,1]]",
                        "--cfg.parallel_config.vit_pp_layers", "[[2,0]]",
                        "--cfg.parallel_config.tp_size", "2"],
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (mm / "release" / "mp_rank_01_001" / "model.safetensors").is_file()
    # mm_to_hf as in the guide: flat [...] lists
    assert cli("Qwen2_5_VLConverter", "mm_to_hf", "--cfg.save_hf_dir", back, "--cfg.mm_dir", mm,
               "--cfg.hf_config.hf_dir", HF, "--cfg.parallel_config.llm_pp_layers", "[1,1]",
               "--cfg.parallel_config.vit_pp_layers", "[2,0]", "--cfg.parallel_config.tp_size", "2") == 0
    a, b = read_safetensors(back / "model.safetensors"), read_safetensors(HF / "model.safetensors")
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    # resplit with MindSpeed-MM's argument names
    assert cli("Qwen2_5_VLConverter", "resplit", "--cfg.source_dir", mm, "--cfg.target_dir", tmp_path / "re",
               "--cfg.source_parallel_config.tp_size", "2",
               "--cfg.target_parallel_config.llm_pp_layers", "[2]", "--cfg.target_parallel_config.vit_pp_layers",
               "[2]", "--cfg.target_parallel_config.tp_size=1") == 0
    layout = json.loads((tmp_path / "re/release/parallel_layout.json").read_text())
    assert layout["tp_size"] == 1 and layout["llm_pp_layers"] == [2]


def test_mm_to_hf_reads_latest_training_iteration(tmp_path):
    from convert import load_hf_as_mm
    from ms_mm.training.mm_checkpoint import save_model, ParallelLayout
    _, mm = load_hf_as_mm(HF)
    mm["text_decoder.decoder.final_layernorm.weight"] = mm["text_decoder.decoder.final_layernorm.weight"] + 1
    save_model(tmp_path / "save", mm, ParallelLayout(pp_layers={"llm": [1, 1], "vit": [2, 0]}), iteration=7)
    assert cli("Qwen2_5_VLConverter", "mm_to_hf", "--cfg.save_hf_dir", tmp_path / "out", "--cfg.mm_dir",
               tmp_path / "save", "--cfg.hf_config.hf_dir", HF) == 0
    out = read_safetensors(tmp_path / "out" / "model.safetensors")
    np.testing.assert_array_equal(out["model.norm.weight"], mm["text_decoder.decoder.final_layernorm.weight"])


@pytest.mark.parametrize("args,message", [
    (["NoSuchConverter", "hf_to_mm"], "unknown converter or model family 'NoSuchConverter'; known: .*Qwen2_5_VLConverter"),
    (["Qwen2_5_VLConverter", "to_gguf"], "unknown action 'to_gguf'"),
    (["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", "x", "--cfg.hf_config.hf_dir", str(HF), "--cfg.pp_size", "2"],
     r"unknown option\(s\) --cfg\.pp_size for Qwen2_5_VLConverter hf_to_mm; known: .*--cfg\.mm_dir"),
    (["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.hf_config.hf_dir", str(HF)], "missing required option --cfg.mm_dir"),
    (["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", "x", "--cfg.hf_config.hf_dir", str(HF),
      "--cfg.parallel_config.tp_size", "two"], r"--cfg\.parallel_config\.tp_size: expected an integer, got 'two'"),
    (["Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir"], r"option --cfg\.mm_dir needs a value"),
])
def test_usage_errors(tmp_path, capsys, args, message):
    assert cli(*args) == 2
    import re
    assert re.search(message, capsys.readouterr().err)


def test_conversion_errors_exit_1_and_name_the_problem(tmp_path, capsys):
    assert cli("Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", HF,
               "--cfg.parallel_config.llm_pp_layers", "[[1,10,10,7]]",
               "--cfg.parallel_config.vit_pp_layers", "[[32,0,0,0]]") == 1
    err = capsys.readouterr().err
    assert "vit_pp_layers [32, 0, 0, 0] sums to 32, but the vision encoder (vision_config.depth) has 2 layers" in err \
        or "llm_pp_layers [1, 10, 10, 7] sums to 28, but the language model (num_hidden_layers) has 2 layers" in err
    assert not (tmp_path / "mm").exists()
    assert cli("Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir",
               tmp_path / "nowhere") == 1
    assert "HF directory" in capsys.readouterr().err


def test_tiny_builder_writes_a_loadable_hf_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "convert.tiny", "qwen2_5_vl", "--out", str(tmp_path / "tiny"),
                        "--seed", "3"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "tiny"
    from transformers import AutoConfig, PreTrainedTokenizerFast
    cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)  # transformers parses it as 4.57.1 does
    assert type(cfg).__name__ == "Qwen2_5_VLConfig" and cfg.text_config.num_hidden_layers >= 2
    tok = PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)
    assert len(tok) <= cfg.text_config.vocab_size
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    v = cfg.vision_config
    assert v.window_size // (v.patch_size * v.spatial_merge_size) >= 2 and len(v.fullatt_block_indexes) == 1
    assert (d / "preprocessor_config.json").is_file() and (d / "generation_config.json").is_file()
    w = read_safetensors(d / "model.safetensors")
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std() * np.sqrt(q.shape[1]) - 1) < 0.1  # N(0, 1/fan_in)
    assert np.all(w["model.norm.weight"] == 1) and np.all(w["visual.blocks.0.attn.qkv.bias"] == 0)
    from convert.tiny import build_tiny
    build_tiny("qwen2_5_vl", tmp_path / "t2", seed=3)  # deterministic in the seed
    assert (tmp_path / "t2/model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    assert cli("Qwen2_5_VLConverter", "hf_to_mm", "--cfg.mm_dir", tmp_path / "mm", "--cfg.hf_config.hf_dir", d) == 0


def test_conversion_memory_stays_below_checkpoint_size(tmp_path):
    """~300 MB HF checkpoint → MM with tp=2, pp=2: peak RSS growth must stay far below 300 MB."""
    from convert.tiny import write_random_hf
    cfg = {"model_type": "qwen2_5_vl", "tie_word_embeddings": False, "image_token_id": 5,
           "video_token_id": 6, "vision_start_token_id": 7, "vision_end_token_id": 8,
           "text_config": {"vocab_size": 16384, "hidden_size": 1024, "intermediate_size": 2816,
                           "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                           "rope_scaling": {"mrope_section": [16, 24, 24]}},
           "vision_config": {"depth": 2, "hidden_size": 256, "num_heads": 4, "intermediate_size": 512,
                             "out_hidden_size": 1024, "window_size": 112, "fullatt_block_indexes": [1]}}
    write_random_hf(tmp_path / "hf", cfg, fill="fast", max_shard_bytes=100 * 2 ** 20)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    size = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors"))
    assert size > 250 * 2 ** 20
    conv = textwrap.dedent(f"""
        import json
        import numpy, convert.framework
        convert.framework.get_spec("qwen2_5_vl")  # imports first (the model package may pull in MindSpore)

        def status(key):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
        # ru_maxrss would be inherited from the parent over fork/exec; VmHWM is ours and resettable
        open("/proc/self/clear_refs", "w").write("5")
        base = status("VmRSS")
        convert.framework.hf_to_mm("{tmp_path}/hf", "{tmp_path}/mm", "qwen2_5_vl", 2,
                                   {{"llm": [2, 2], "vit": [2, 0]}})
        peak = status("VmHWM")
        print(json.dumps({{"base_kb": base, "peak_kb": peak}}))
        assert sum(1 for _ in __import__("pathlib").Path("{tmp_path}/mm/release").rglob("*.safetensors")) == 4
    """)
    r = subprocess.run([sys.executable, "-c", conv], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = (m["peak_kb"] - m["base_kb"]) * 1024
    largest = 16384 * 1024 * 4  # the embedding / output layer, 64 MiB
    assert growth < 2 * largest < size / 2, (growth / 2 ** 20, size / 2 ** 20)


def test_guide_spellings_source_target_path_and_trust_remote_code(tmp_path, capsys):
    # BAGEL/Lumina guides name the dirs source_path/target_path; DeepSeek's passes trust_remote_code True
    assert cli("Qwen2_5_VLConverter", "hf_to_mm", "--cfg.source_path", HF, "--cfg.target_path", tmp_path / "mm",
               "--cfg.trust_remote_code", "True", "--cfg.parallel_config.ep_size", "1") == 0
    assert "trust_remote_code is accepted but unused" in capsys.readouterr().err
    assert (tmp_path / "mm/release/mp_rank_00/model.safetensors").is_file()
    assert cli("Qwen2_5_VLConverter", "hf_to_mm", "--cfg.source_path", HF, "--cfg.target_path", tmp_path / "m2",
               "--cfg.parallel_config.ep_size", "2") == 1
    assert "ep_size 2 given but the model has no expert tensors" in capsys.readouterr().err

"""The Qwen2.5-VL plan compiled for 8 simulated Ascend ranks with MindSpore's DryRun.

Each case compiles one real train step (forward, backward, AdamW under semi_auto_parallel) in a
separate process per rank, then checks that the step returned, that MindSpore's predicted peak
memory was parsed from the log, and that the parameters were laid out as the Megatron plan says
(MindSpore's own ``parameter_layout_dict``, dumped by the worker).
"""
import json
from pathlib import Path

from dryrun_support import TINY_TP4, fake_cann_root  # noqa: F401  (session fixture)
from ms_mm.parallel import ParallelConfig
from ms_mm.parallel.dryrun import load_model_config, main, run_dryrun

LLM0 = "text_decoder.decoder.layers.0."
VIT0 = "image_encoder.encoder.blocks.layers.0."


def _layouts(result):
    return json.loads((Path(result.log_path).parent / "parameter_layouts.json").read_text())


def _compile(fake_cann_root, tmp_path, model, tp, rank, dtype):
    config = load_model_config(model)
    pc = ParallelConfig(world_size=8, tp=tp)
    [result] = run_dryrun(config, pc, micro_batch_size=1, seq_len=64, ranks=[rank], level=1, dtype=dtype,
                          workdir=tmp_path, fake_cann_root=fake_cann_root, timeout=600)
    assert result.ok, f"rank {rank} failed:\n{result.error}\n{result.hint}"
    assert result.used_peak_mb is not None and result.used_peak_mb > 0
    assert result.actual_peak_mb is not None and result.actual_peak_mb >= result.used_peak_mb
    return config, _layouts(result)


def test_tiny_tp2_dp4_compiles_bf16_through_the_cli(fake_cann_root, tmp_path, capsys):
    report = tmp_path / "report.json"
    rc = main(["--mm-model", "tiny", "--tp", "2", "--world-size", "8", "--micro-batch-size", "1", "--seq-len", "64",
               "--level", "1", "--ranks", "0", "--dtype", "bf16", "--workdir", str(tmp_path / "work"),
               "--fake-cann", str(fake_cann_root), "--report-json", str(report)])
    out = capsys.readouterr().out
    [result] = json.loads(report.read_text())["ranks"]
    assert rc == 0, out
    assert result["ok"] and result["used_peak_mb"] > 0 and result["actual_peak_mb"] >= result["used_peak_mb"]
    assert f"rank 0: ok, used peak {result['used_peak_mb']}M, actual peak {result['actual_peak_mb']}M" in out
    config = load_model_config("tiny")
    layouts = json.loads((Path(result["log_path"]).parent / "parameter_layouts.json").read_text())
    h, v = config.text.hidden_size, config.text.vocab_size
    qkv_rows = (config.text.num_attention_heads + 2 * config.text.num_key_value_heads) * config.text.head_dim
    expect = {
        LLM0 + "self_attention.linear_qkv.weight": [qkv_rows // 2, h],      # column-parallel
        LLM0 + "self_attention.linear_qkv.bias": [qkv_rows // 2],
        LLM0 + "self_attention.linear_proj.weight": [h, h // 2],           # row-parallel
        LLM0 + "mlp.linear_fc1.weight": [config.text.intermediate_size, h],  # [2I, H] / 2
        LLM0 + "mlp.linear_fc2.weight": [h, config.text.intermediate_size // 2],
        LLM0 + "input_layernorm.weight": [h],                              # replicated
        "text_decoder.embedding.word_embeddings.weight": [v // 2, h],      # vocab-parallel
        "text_decoder.output_layer.weight": [v // 2, h],
        VIT0 + "self_attention.linear_qkv.weight": [3 * config.vision.hidden_size // 2, config.vision.hidden_size],
        VIT0 + "mlp.linear_fc2.weight": [config.vision.hidden_size, config.vision.intermediate_size // 2],
        "image_encoder.projector.encoder.linear_fc1.weight": [64, 128],
        "adam_m." + LLM0 + "self_attention.linear_qkv.weight": [qkv_rows // 2, h],  # optimizer state follows
    }
    got = {name: layouts[name]["slice_shape"] for name in expect}
    assert got == expect


def test_tiny_tp4_dp2_compiles_fp32_on_rank_5(fake_cann_root, tmp_path):
    config, layouts = _compile(fake_cann_root, tmp_path, dict(TINY_TP4), tp=4, rank=5, dtype="fp32")
    h = config.text.hidden_size
    qkv_rows = (config.text.num_attention_heads + 2 * config.text.num_key_value_heads) * config.text.head_dim
    assert layouts[LLM0 + "self_attention.linear_qkv.weight"]["slice_shape"] == [qkv_rows // 4, h]
    assert layouts[LLM0 + "self_attention.linear_proj.weight"]["slice_shape"] == [h, h // 4]
    assert layouts["text_decoder.embedding.word_embeddings.weight"]["slice_shape"] == [config.text.vocab_size // 4, h]
    assert layouts[VIT0 + "self_attention.linear_proj.weight"]["slice_shape"] == [32, 8]


def test_plan_mindspore_refuses_shows_its_error_and_ours(fake_cann_root, tmp_path):
    """tp=4 with 2 KV heads, past our own check: MindSpore refuses to compile, and we name the split."""
    config = load_model_config("tiny")
    pc = ParallelConfig(world_size=8, tp=4)
    [result] = run_dryrun(config, pc, micro_batch_size=1, seq_len=64, ranks=[0], level=0, dtype="fp32",
                          workdir=tmp_path, fake_cann_root=fake_cann_root, skip_checks=True, timeout=600)
    assert not result.ok
    assert "cannot be divisible by strategy value 4" in result.error
    assert result.hint.startswith("ms-mm: tp=4 does not divide dim 1 (size 2) of the ")


def test_tiny_pp2_tp2_stages_hold_their_layers(fake_cann_root, tmp_path):
    """pp=2: stage 0 (ranks 0-3) holds the vision tower, embeddings and LLM layer 0; stage 1 the rest."""
    config = load_model_config("tiny")
    pc = ParallelConfig(world_size=8, tp=2, pp=2, llm_pp_layers=[[1, 1]], vit_pp_layers=[[2, 0]])
    results = run_dryrun(config, pc, micro_batch_size=1, seq_len=64, ranks=[0, 4], level=1, dtype="fp32",
                         workdir=tmp_path, fake_cann_root=fake_cann_root, timeout=600, parallel_ranks=2)
    for r in results:
        assert r.ok, f"rank {r.rank} failed:\n{r.error}\n{r.hint}"
        assert r.used_peak_mb is not None
    # model parameters only (not optimizer state, nor the pipeline's receive buffers "inputsN")
    stage0, stage1 = ({k for k in _layouts(r) if k.startswith(("image_encoder.", "text_decoder."))} for r in results)
    assert "image_encoder.encoder.patch_embed.proj.weight" in stage0
    assert "image_encoder.projector.encoder.linear_fc2.weight" in stage0
    assert LLM0 + "self_attention.linear_qkv.weight" in stage0
    assert "text_decoder.embedding.word_embeddings.weight" in stage0
    assert not any(".layers.1." in n and n.startswith("text_decoder") for n in stage0)
    assert not any(n.startswith("image_encoder") for n in stage1)
    assert "text_decoder.decoder.layers.1.self_attention.linear_qkv.weight" in stage1
    assert {"text_decoder.output_layer.weight", "text_decoder.decoder.final_layernorm.weight"} <= stage1
    assert not any(n.startswith(LLM0) for n in stage1)
    # tp still splits inside a stage
    assert _layouts(results[1])["text_decoder.output_layer.weight"]["slice_shape"] == [config.text.vocab_size // 2,
                                                                                      config.text.hidden_size]


def test_rank_past_the_host_memory_limit_is_stopped(fake_cann_root, tmp_path):
    config = load_model_config("tiny")
    [result] = run_dryrun(config, ParallelConfig(world_size=8, tp=2), micro_batch_size=1, seq_len=64, ranks=[0],
                          level=0, dtype="fp32", workdir=tmp_path, fake_cann_root=fake_cann_root,
                          host_mem_limit_gb=0.05)  # importing mindspore alone takes more
    assert not result.ok
    assert result.error.startswith("ms-mm: rank 0 used more than 0.05 GiB of host memory while compiling; stopped")


def test_pipeline_stage_of_7b_widths_compiles_without_materialising_weights(fake_cann_root, tmp_path):
    """Stage 1 holds ~1.0e9 parameters (two 7B layers + the output layer: 4 GB each in fp32, for the
    weights and again for the gradient buffers). MindSpore's own pipeline train cell folds
    zeros_like(parameter) into constants and took 8.3 GB here; ours must stay under 3 GB."""
    config = load_model_config({"preset": "7b", "text": {"num_hidden_layers": 4},
                                "vision": {"depth": 2, "fullatt_block_indexes": [1]}})
    pc = ParallelConfig(world_size=2, pp=2, llm_pp_layers=[2, 2], vit_pp_layers=[2, 0])
    [result] = run_dryrun(config, pc, micro_batch_size=1, seq_len=256, ranks=[1], level=0, dtype="bf16",
                          workdir=tmp_path, fake_cann_root=fake_cann_root, host_mem_limit_gb=3, timeout=600)
    assert result.ok, f"{result.error}\n{result.hint}"

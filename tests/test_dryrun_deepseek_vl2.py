"""The DeepSeek-VL2 plan (data, tensor and expert parallel) compiled for 8 simulated Ascend ranks.

One rank process per setting compiles a real train step of the tiny model (forward, backward,
AdamW under semi_auto_parallel, Ascend kernels) at DryRun level 1; the test checks the step
returned, that MindSpore's predicted peak memory was parsed, and that MindSpore laid the parameters
out as the plan says (its ``parameter_layout_dict``, dumped by the worker). A plan that does not
divide is refused before anything compiles (``test_parallel_plan_deepseek_vl2.py`` has the rest).
"""
import json
from pathlib import Path

import pytest

from dryrun_support import fake_cann_root  # noqa: F401  (session fixture)
from ms_mm.parallel import ParallelConfig
from ms_mm.parallel.dryrun import load_model_config, main, run_dryrun

REPO = Path(__file__).resolve().parents[1]
MHA_JSON = REPO / "tests" / "fixtures" / "deepseek_vl2_shapes" / "lm_mha_gqa_sigmoid" / "hf" / "config.json"
MOE = "text_decoder.decoder.layers.1.mlp."
FC1, FC2 = MOE + "experts.local_experts.{e}.linear_fc1.weight", MOE + "experts.local_experts.{e}.linear_fc2.weight"


def _layouts(log_path):
    return {k: v["slice_shape"] for k, v in
            json.loads((Path(log_path).parent / "parameter_layouts.json").read_text()).items()}


@pytest.mark.parametrize("tp,ep,rank", [(1, 2, 0), (1, 4, 5), (2, 2, 3)])
def test_tiny_expert_parallel_compiles(fake_cann_root, tmp_path, tp, ep, rank):  # noqa: F811
    config = load_model_config("tiny-deepseek")  # 4 routed experts (I=32), 1 shared, MLA 4 heads, H=64
    pc = ParallelConfig(world_size=8, tp=tp, ep=ep)
    [result] = run_dryrun(config, pc, micro_batch_size=1, seq_len=32, ranks=[rank], level=1, dtype="fp16",
                          workdir=tmp_path, fake_cann_root=fake_cann_root, timeout=600)
    assert result.ok, f"rank {rank} failed:\n{result.error}\n{result.hint}"
    assert result.used_peak_mb is not None and result.used_peak_mb > 0
    assert result.actual_peak_mb is not None and result.actual_peak_mb >= result.used_peak_mb
    layouts = _layouts(result.log_path)
    lc = config.language_config
    h, i = lc.hidden_size, lc.moe_intermediate_size
    for e in range(lc.n_routed_experts):
        # every expert stored 1/(ep*tp) per rank: FFN width by tp, hidden width by ep
        assert layouts[FC1.format(e=e)] == [2 * i // tp, h // ep]
        assert layouts[FC2.format(e=e)] == [h // ep, i // tp]
        assert layouts["adam_m." + FC1.format(e=e)] == [2 * i // tp, h // ep]  # optimizer state follows
    assert layouts[MOE + "router.weight"] == [lc.n_routed_experts, h]  # replicated
    assert layouts[MOE + "shared_experts.linear_fc2.weight"] == [h, i // tp]
    assert layouts["text_decoder.embedding.word_embeddings.weight"] == [lc.vocab_size // tp, h]
    assert layouts["text_decoder.decoder.layers.0.self_attention.linear_kvb.weight"] == [
        lc.num_attention_heads * (lc.qk_nope_head_dim + lc.v_head_dim) // tp, lc.kv_lora_rank]
    width = config.vision_config.width
    assert layouts["image_encoder.encoder.blocks.0.attn.qkv.weight"] == [3 * width // tp, width]


def test_mha_hf_config_tp2_compiles_bf16_through_the_cli(fake_cann_root, tmp_path, capsys):  # noqa: F811
    report = tmp_path / "report.json"
    rc = main(["--mm-model", str(MHA_JSON), "--tensor-model-parallel-size", "2", "--world-size", "8",
               "--seq-len", "48", "--level", "1", "--ranks", "0", "--dtype", "bf16", "--workdir", str(tmp_path / "w"),
               "--fake-cann", str(fake_cann_root), "--report-json", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    [result] = json.loads(report.read_text())["ranks"]
    assert result["ok"] and result["used_peak_mb"] > 0
    assert "dp=4 tp=2 pp=1 ep=1" in out and "rank 0: ok, used peak" in out
    lc = load_model_config(str(MHA_JSON)).language_config
    layouts = _layouts(result["log_path"])
    qkv_rows = (lc.num_attention_heads + 2 * lc.num_key_value_heads) * lc.head_dim
    assert layouts["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"] == [qkv_rows // 2, lc.hidden_size]
    assert layouts[FC1.format(e=0)] == [lc.moe_intermediate_size, lc.hidden_size]

"""The DeepSeek-VL2 plan (data, tensor and expert parallel) compiled for 8 simulated Ascend ranks.

One rank process per setting compiles a real train step of the tiny model (forward, backward,
AdamW under semi_auto_parallel, Ascend kernels) at DryRun level 1; the test checks the step
returned, that MindSpore's predicted peak memory was parsed, and that MindSpore laid the parameters
out as the plan says (its ``parameter_layout_dict``, dumped by the worker). A plan that does not
divide is refused before anything compiles (``test_parallel_plan_deepseek_vl2.py`` has the rest).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from dryrun_support import collectives, fake_cann_root  # noqa: F401  (session fixture)
from ms_mm.ops.moe import expert_capacity
from ms_mm.parallel import ParallelConfig
from ms_mm.parallel.dryrun import load_model_config, main, run_dryrun

REPO = Path(__file__).resolve().parents[1]
MHA_JSON = REPO / "tests" / "fixtures" / "deepseek_vl2_shapes" / "lm_mha_gqa_sigmoid" / "hf" / "config.json"
MOE = "text_decoder.decoder.layers.1.mlp."
FC1, FC2 = MOE + "experts.linear_fc1.weight", MOE + "experts.linear_fc2.weight"   # stacked [E, 2I, H] / [E, H, I]


def _layouts(log_path):
    return {k: v["slice_shape"] for k, v in
            json.loads((Path(log_path).parent / "parameter_layouts.json").read_text()).items()}


@pytest.mark.parametrize("tp,ep,rank,capacity", [(1, 2, 0, None), (1, 4, 5, None), (2, 2, 0, 1.0)])
def test_tiny_expert_parallel_compiles(fake_cann_root, tmp_path, monkeypatch, tp, ep, rank, capacity):  # noqa: F811
    """capacity None: the dense batched dispatch (dropless); 1.0: the capacity dispatch (drop and pad),
    whose tokens move to the experts' ranks by all-to-all."""
    config = load_model_config("tiny-deepseek")  # 4 routed experts (I=32), 1 shared, MLA 4 heads, H=64
    config.language_config.moe_expert_capacity_factor = capacity
    pc = ParallelConfig(world_size=8, tp=tp, ep=ep)
    if rank == 0:  # the compiled graph, to see what travels between the ranks
        monkeypatch.setenv("MS_DEV_SAVE_GRAPHS", "1")
        monkeypatch.setenv("MS_DEV_SAVE_GRAPHS_PATH", str(tmp_path / "ir"))
    seq_len = 32
    [result] = run_dryrun(config, pc, micro_batch_size=1, seq_len=seq_len, ranks=[rank], level=1, dtype="fp16",
                          workdir=tmp_path, fake_cann_root=fake_cann_root, timeout=600)
    assert result.ok, f"rank {rank} failed:\n{result.error}\n{result.hint}"
    assert result.used_peak_mb is not None and result.used_peak_mb > 0
    assert result.actual_peak_mb is not None and result.actual_peak_mb >= result.used_peak_mb
    layouts = _layouts(result.log_path)
    lc = config.language_config
    h, i = lc.hidden_size, lc.moe_intermediate_size
    n = lc.n_routed_experts
    # each rank holds E/ep whole experts (their FFN width split by tp), the optimizer state the same
    assert layouts[FC1] == [n // ep, 2 * i // tp, h]
    assert layouts[FC2] == [n // ep, h, i // tp]
    assert layouts["adam_m." + FC1] == [n // ep, 2 * i // tp, h]
    if rank == 0:
        # no expert weight is gathered: no collective takes a rank's expert block; only their gradients
        # are summed over the ranks holding the same experts (and tokens move, as activations)
        local = {(n // ep, 2 * i // tp, h), (n // ep, h, i // tp)}
        ops = collectives(tmp_path / "ir")
        assert {op for op, src, _, _ in ops if src in local} == {"AllReduce"}, ops
        every = {(n, 2 * i // t, h) for t in (1, tp)} | {(n, h, i // t) for t in (1, tp)}
        assert not [c for c in ops if c[2] in every], ops   # nothing holding all E experts' weights
        moves = [c for c in ops if "experts-RoutedExperts" in c[3] and c[0] == "AllToAll"]
        if capacity is not None:
            # the rank's capacity buffer (E experts x C slots x H), to the experts and back, and the same
            # two in the backward pass; nothing else of the experts' activations is gathered over dp
            slots = expert_capacity(seq_len, lc.num_experts_per_tok, n, capacity)
            assert len(moves) == 4 and all(np.prod(c[1]) == n * slots * h for c in moves), moves
            gathered = [c for c in ops if "experts-RoutedExperts" in c[3] and c[0] == "AllGather"
                        and np.prod(c[2]) >= slots * h]
            # (only the tp re-gather of [gate; up] before the SwiGLU, over the tp pair)
            assert all(c[2][-1] == 2 * i // tp and np.prod(c[2]) == 2 * np.prod(c[1]) for c in gathered), gathered
    assert layouts[MOE + "router.weight"] == [lc.n_routed_experts, h]  # replicated
    assert layouts[MOE + "shared_experts.linear_fc2.weight"] == [h, i // tp]
    assert layouts["text_decoder.embedding.word_embeddings.weight"] == [lc.vocab_size // tp, h]
    assert layouts["text_decoder.decoder.layers.0.self_attention.linear_kvb.weight"] == [
        lc.num_attention_heads * (lc.qk_nope_head_dim + lc.v_head_dim) // tp, lc.kv_lora_rank]
    width = config.vision_config.width
    assert layouts["image_encoder.encoder.blocks.0.attn.qkv.weight"] == [3 * width, width]   # whole, as the table says


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
    assert layouts[FC1] == [lc.n_routed_experts, lc.moe_intermediate_size, lc.hidden_size]

"""The DeepSeek-VL2 plan (data, tensor and expert parallel) compiled for 8 simulated Ascend ranks.

One rank process per setting compiles a real train step of the tiny model (forward, backward,
AdamW under semi_auto_parallel, Ascend kernels) at DryRun level 1; the test checks the step
returned, that MindSpore's predicted peak memory was parsed, and that MindSpore laid the parameters
out as the plan says (its ``parameter_layout_dict``, dumped by the worker). A plan that does not
divide is refused before anything compiles (``test_parallel_plan_deepseek_vl2.py`` has the rest).
"""
import json
import re
from pathlib import Path

import pytest

from dryrun_support import fake_cann_root  # noqa: F401  (session fixture)
from ms_mm.parallel import ParallelConfig
from ms_mm.parallel.dryrun import load_model_config, main, run_dryrun

REPO = Path(__file__).resolve().parents[1]
MHA_JSON = REPO / "tests" / "fixtures" / "deepseek_vl2_shapes" / "lm_mha_gqa_sigmoid" / "hf" / "config.json"
MOE = "text_decoder.decoder.layers.1.mlp."
FC1, FC2 = MOE + "experts.linear_fc1.weight", MOE + "experts.linear_fc2.weight"   # stacked [E, 2I, H] / [E, H, I]


def _layouts(log_path):
    return {k: v["slice_shape"] for k, v in
            json.loads((Path(log_path).parent / "parameter_layouts.json").read_text()).items()}


def _collectives(ir_dir):
    """(op, input shape, output shape) of every collective in the final compiled graph of a rank."""
    [graph] = sorted(Path(ir_dir).rglob("graph_build_*.ir"))[-1:]
    lines = graph.read_text().splitlines()
    shape = r"<Tensor\[\w+\], \(([\d, ]*)\)>"
    out = []
    for line, nxt in zip(lines, lines[1:]):
        m = re.match(r"\s+%\S+ = (AllGather|ReduceScatter|AllReduce|AlltoAll\w*|AllToAll\w*)\(", line)
        shapes = re.findall(shape, nxt)
        if m and len(shapes) >= 2:
            out.append((m.group(1),) + tuple(tuple(int(d) for d in s.split(",") if d.strip()) for s in shapes[:2]))
    return out


@pytest.mark.parametrize("tp,ep,rank", [(1, 2, 0), (1, 4, 5), (2, 2, 3)])
def test_tiny_expert_parallel_compiles(fake_cann_root, tmp_path, monkeypatch, tp, ep, rank):  # noqa: F811
    config = load_model_config("tiny-deepseek")  # 4 routed experts (I=32), 1 shared, MLA 4 heads, H=64
    pc = ParallelConfig(world_size=8, tp=tp, ep=ep)
    if rank == 0:  # the compiled graph, to see what travels between the ranks
        monkeypatch.setenv("MS_DEV_SAVE_GRAPHS", "1")
        monkeypatch.setenv("MS_DEV_SAVE_GRAPHS_PATH", str(tmp_path / "ir"))
    [result] = run_dryrun(config, pc, micro_batch_size=1, seq_len=32, ranks=[rank], level=1, dtype="fp16",
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
        ops = _collectives(tmp_path / "ir")
        assert {op for op, src, _ in ops if src in local} == {"AllReduce"}, ops
        every = {(n, 2 * i // t, h) for t in (1, tp)} | {(n, h, i // t) for t in (1, tp)}
        assert not [c for c in ops if c[2] in every], ops   # nothing holding all E experts' weights
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

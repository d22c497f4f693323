"""The DeepSeek-VL2 parallel plan without compiling: the checks against the model, the strategies it
attaches, and the DryRun CLI's DeepSeek-VL2 model forms (presets, HF config.json, MindSpeed model.json)."""
import json
from pathlib import Path

import pytest

from adapters.deepseek_vl2 import config_from_hf
from ms_mm.models.deepseek_vl2 import DeepseekVL2Config, DeepseekVL2ForCausalLM
from ms_mm.models.deepseek_vl2.inputs import num_image_tokens
from ms_mm.parallel import ParallelConfig, ParallelConfigError, parallelize, plan_for_config
from ms_mm.parallel.dryrun import load_model_config, main, synthetic_batch

REPO = Path(__file__).resolve().parents[1]
MHA_JSON = REPO / "tests" / "fixtures" / "deepseek_vl2_shapes" / "lm_mha_gqa_sigmoid" / "hf" / "config.json"
TINY = DeepseekVL2Config.preset("tiny")  # MLA, 4 heads, 4 routed experts (top-2) + 1 shared


def _check(config, **sizes):
    return ParallelConfig(**sizes).check_model(config)


def test_registered_and_good_plans_pass():
    assert plan_for_config(TINY).family == "deepseek_vl2"
    for sizes in ({"world_size": 8, "ep": 2}, {"world_size": 8, "ep": 4}, {"world_size": 8, "tp": 2, "ep": 2},
                  {"world_size": 8, "tp": 2}, {"world_size": 4, "tp": 2, "ep": 2}):
        _check(TINY, **sizes)


def test_ep_must_divide_the_routed_experts():
    with pytest.raises(ParallelConfigError, match=r"ep=3 does not divide language_config.n_routed_experts=4 \("
                       r"text_decoder.decoder.layers.\*.mlp.experts.linear_fc1.weight \(stacked expert weights\) has shape "
                       r"\[4, 64, 64\]; each EP rank must hold the same number of whole experts\)"):
        _check(TINY, world_size=6, ep=3)
    mha = config_from_hf(json.loads(MHA_JSON.read_text()))  # 6 routed experts
    with pytest.raises(ParallelConfigError, match=r"ep=4 does not divide language_config.n_routed_experts=6"):
        _check(mha, world_size=8, ep=4)
    _check(mha, world_size=8, ep=2)


def test_tp_must_divide_heads_and_widths():
    with pytest.raises(ParallelConfigError, match=r"tp=8 does not divide language_config.num_attention_heads=4 "
                       r"\(text_decoder.decoder.layers.\*.self_attention.linear_kvb.weight has shape \[128, 32\]; "
                       r"MLA heads are split across tp ranks\)"):
        _check(TINY, world_size=8, tp=8)
    mha = config_from_hf(json.loads(MHA_JSON.read_text()))  # 4 heads, 2 KV heads
    with pytest.raises(ParallelConfigError, match=r"tp=4 does not divide language_config.num_key_value_heads=2 "
                       r"\(text_decoder.decoder.layers.\*.self_attention.linear_qkv.weight has shape \[96, 48\]"):
        _check(mha, world_size=8, tp=4)
    narrow = DeepseekVL2Config.from_dict({**TINY.to_dict(), "language_config": {
        **TINY.to_dict()["language_config"], "moe_intermediate_size": 30}})
    with pytest.raises(ParallelConfigError, match=r"tp=4 does not divide language_config.moe_intermediate_size=30 "
                       r"\(text_decoder.decoder.layers.\*.mlp.experts.linear_fc2.weight has shape "
                       r"\[4, 64, 30\]"):
        _check(narrow, world_size=8, tp=4)


def test_pipeline_stages():
    """pp > 1: the layer lists are checked against the model, EP stays inside a stage's dp ranks, and the
    stages follow the converter's table: the tower, projector and image scatter on the vision's last stage
    (stage 0 by default), the LLM layers by ``llm_pp_layers``, the final norm and output layer last."""
    layers = TINY.language_config.num_hidden_layers
    _check(TINY, world_size=8, tp=2, pp=2, ep=2)
    with pytest.raises(ParallelConfigError, match=rf"llm_pp_layers=\[1, 2\] sums to 3 layers but the model has {layers}"):
        _check(TINY, world_size=8, pp=2, llm_pp_layers=[1, 2])
    with pytest.raises(ParallelConfigError, match=r"ep=4 does not divide the data-parallel size dp=2"):
        _check(TINY, world_size=8, tp=2, pp=2, ep=4)
    model = DeepseekVL2ForCausalLM(TINY)
    parallelize(model, ParallelConfig(world_size=8, tp=2, pp=2, ep=2, llm_pp_layers=[1, layers - 1]))
    image, text = model.image_encoder, model.text_decoder
    assert {c.pipeline_stage for c in [image.encoder, image.encoder.patch_embed, *image.encoder.blocks,
                                       image.encoder.norm, image.projector, model.image_scatter,
                                       text.embedding, text.embedding.word_embeddings]} == {0}
    assert [layer.pipeline_stage for layer in text.decoder.layers] == [0] + [1] * (layers - 1)
    assert text.decoder.final_layernorm.pipeline_stage == text.output_layer.pipeline_stage == 1


def test_unsupported_sizes_are_refused():
    with pytest.raises(ParallelConfigError, match=r"cp=2: context parallel is not implemented"):
        _check(TINY, world_size=8, cp=2)
    dense = DeepseekVL2Config.from_dict({**TINY.to_dict(), "language_config": {
        **TINY.to_dict()["language_config"], "n_routed_experts": None, "n_shared_experts": None}})
    with pytest.raises(ParallelConfigError, match=r"ep=2: this DeepSeek-VL2 config has no MoE layer "
                       r"\(language_config.n_routed_experts=None"):
        _check(dense, world_size=8, ep=2)


def test_apply_sets_expert_parallel_strategies():
    model = DeepseekVL2ForCausalLM(TINY)
    parallelize(model, ParallelConfig(world_size=8, tp=2, ep=2))  # dp 4: tokens 2 per EP group
    experts = model.text_decoder.decoder.layers[1].mlp.experts
    assert experts.dispatch == "batched"
    assert experts.bmm_fc1.in_strategy == ((2, 2, 1), (2, 2, 1))
    assert experts.bmm_fc2.in_strategy == ((2, 2, 2), (2, 1, 2))
    # the stacked weights are the matmuls' operands: EP rank r holds experts [2r, 2r + 2) whole, FFN width by tp
    assert [p.name.rsplit(".", 2)[-2] for p in experts.get_parameters()] == ["linear_fc1", "linear_fc2"]
    assert model.text_decoder.decoder.layers[1].mlp.router.matmul.in_strategy == ((4, 1), (1, 1))
    attn = model.text_decoder.decoder.layers[0].self_attention
    assert attn.linear_kvb.matmul.in_strategy == ((4, 1), (2, 1))      # column-parallel on heads
    assert attn.linear_qkv.matmul.in_strategy == ((4, 1), (1, 1))      # MLA latent: replicated
    assert attn.linear_proj.matmul.in_strategy == ((4, 2), (1, 2))     # row-parallel
    vision = model.image_encoder.encoder.blocks[0]
    # each dp rank encodes its own samples' tiles (rows split by dp); the weights whole, as the checkpoint's
    # TP table keeps the vision tower
    assert vision.attn.qkv.matmul.in_strategy == ((4, 1), (1, 1))
    assert vision.attn.core_attention.bmm_qk.in_strategy == ((4, 1, 1, 1), (4, 1, 1, 1))


def test_model_json_forms(tmp_path):
    assert load_model_config("tiny-deepseek") == TINY
    assert load_model_config("deepseek-vl2-small") == DeepseekVL2Config.preset("Small")
    assert load_model_config(str(MHA_JSON)) == config_from_hf(json.loads(MHA_JSON.read_text()))
    path = tmp_path / "model.json"
    path.write_text(json.dumps(TINY.to_dict()))
    assert load_model_config(str(path)) == TINY
    over = load_model_config({"preset": "tiny-deepseek", "language_config": {"n_routed_experts": 8}})
    assert over.language_config.n_routed_experts == 8 and over.language_config.hidden_size == 64
    mindspeed = {"model_id": "DeepSeek-VL2",
                 "text_decoder": {"num_layers": 30, "hidden_size": 2560, "num_attention_heads": 32,
                                  "num_query_groups": 32, "ffn_hidden_size": 12288, "moe_intermediate_size": 1536,
                                  "vocab_size": 129280, "multi_head_latent_attention": True, "kv_lora_rank": 512,
                                  "first_k_dense_replace": 1, "num_moe_experts": 72, "n_shared_experts": 2,
                                  "moe_router_topk": 6, "moe_router_load_balancing_type": "noaux_tc",
                                  "moe_router_score_function": "sigmoid", "norm_topk_prob": True,
                                  "routed_scaling_factor": 2.0, "n_group": 1, "topk_group": 1},
                 "image_encoder": {"vision_encoder": {"model_name": "siglip_so400m_patch14_384"},
                                   "vision_projector": {"input_dim": 1152, "n_embed": 2560, "depth": 2,
                                                        "mlp_ratio": 1, "downsample_ratio": 2}}}
    config = load_model_config(mindspeed)
    assert isinstance(config, DeepseekVL2Config)
    assert config.language_config.n_routed_experts == 72 and config.vision_config.layers == 27


def test_synthetic_batch_has_one_tiled_image_per_sample():
    inputs = synthetic_batch(TINY, batch_size=2, seq_len=32)
    n_image = num_image_tokens(1, 1, TINY)
    assert inputs["input_ids"].shape == (2, 32)
    assert inputs["pixel_values"].shape == (4, 3, 70, 70)  # global view + one local tile, per sample
    assert int(inputs["images_seq_mask"].sum()) == 2 * n_image
    assert (inputs["labels"][inputs["images_seq_mask"]] == -100).all()
    with pytest.raises(ValueError, match="too short"):
        synthetic_batch(TINY, 1, n_image)


def test_cli_refuses_ep_not_dividing_the_experts(capsys):
    assert main(["--mm-model", "tiny-deepseek", "--expert-model-parallel-size", "3", "--world-size", "6"]) == 2
    assert "ep=3 does not divide language_config.n_routed_experts=4" in capsys.readouterr().err
    assert main(["--mm-model", str(MHA_JSON), "--ep", "4", "--world-size", "8", "--seq-len", "48"]) == 2
    assert "ep=4 does not divide language_config.n_routed_experts=6" in capsys.readouterr().err

"""The Qwen2.5-VL plan on a CPU-built model: which strategy lands on which primitive, and the stages.

No compilation here (test_dryrun_qwen2_5_vl.py compiles the plans); this pins the plan itself:
Megatron column / row splits, head-split attention, vocab-split embedding and output, the vision
tower kept whole across dp, and the pipeline stage of every Cell.
"""
import pytest

from ms_mm.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from ms_mm.parallel import ParallelConfig, ParallelConfigError, parallelize


def _strategy(primitive):
    return primitive.attrs.get("in_strategy")


@pytest.fixture(scope="module")
def tiny_tp4_config():
    d = Qwen2_5_VLConfig.preset("tiny").to_dict()
    d["vision"]["num_heads"] = 4
    d["text"]["num_key_value_heads"] = 4
    return Qwen2_5_VLConfig.from_dict(d)


def test_text_layers_get_megatron_splits(tiny_tp4_config):
    model = parallelize(Qwen2_5_VLForConditionalGeneration(tiny_tp4_config), ParallelConfig(world_size=8, tp=4))
    dp, tp = 2, 4
    layer = model.text_decoder.decoder.layers[1]
    attn = layer.self_attention
    assert _strategy(attn.linear_qkv.matmul) == ((dp, 1), (tp, 1))
    assert _strategy(attn.linear_qkv.bias_add) == ((dp, tp), (tp,))
    assert _strategy(attn.linear_proj.matmul) == ((dp, tp), (1, tp))
    assert _strategy(layer.mlp.linear_fc1.matmul) == ((dp, 1), (tp, 1))
    assert _strategy(layer.mlp.linear_fc2.matmul) == ((dp, tp), (1, tp))
    heads = (dp, tp, 1, 1)
    assert _strategy(attn.core_attention.bmm_qk) == (heads, heads)
    assert _strategy(attn.core_attention.softmax) == (heads,)
    assert _strategy(attn.core_attention.add) == (heads, (dp, 1, 1, 1))
    assert _strategy(model.text_decoder.embedding.word_embeddings.gather) == ((tp, 1), (dp, 1))
    assert _strategy(model.text_decoder.output_layer.matmul) == ((dp, 1), (tp, 1))


def test_vision_patch_rows_split_by_dp_heads_by_tp(tiny_tp4_config):
    """world 8, tp 4: dp 2. The vision tower's one patch sequence is split by dp on its rows
    (linears, norms, the patch embedding); attention runs on a batch of dp patch groups (each dp rank's
    own images, no keys from other ranks), heads by tp."""
    model = parallelize(Qwen2_5_VLForConditionalGeneration(tiny_tp4_config), ParallelConfig(world_size=8, tp=4))
    block = model.image_encoder.encoder.blocks.layers[0]
    assert model.image_encoder.encoder.groups == 2
    assert _strategy(block.self_attention.linear_qkv.matmul) == ((2, 1), (4, 1))
    assert _strategy(block.self_attention.linear_proj.matmul) == ((2, 4), (1, 4))
    assert _strategy(block.self_attention.linear_proj.bias_add) == ((2, 1), (1,))
    attn = block.self_attention.core_attention
    assert _strategy(attn.bmm_qk) == ((2, 4, 1, 1), (2, 4, 1, 1))
    assert _strategy(attn.add) == ((2, 4, 1, 1), (2, 1, 1, 1))
    assert _strategy(attn.bmm_pv) == ((2, 4, 1, 1), (2, 4, 1, 1))
    merger = model.image_encoder.projector.encoder
    assert _strategy(merger.linear_fc1.matmul) == ((2, 1), (4, 1))
    assert _strategy(merger.linear_fc2.matmul) == ((2, 4), (1, 4))
    assert _strategy(model.image_encoder.encoder.patch_embed.proj.matmul) == ((2, 1), (1, 1))


def test_tied_embeddings_split_the_logits_matmul():
    d = Qwen2_5_VLConfig.preset("tiny").to_dict()
    d["text"]["tie_word_embeddings"] = True
    model = parallelize(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(d)),
                        ParallelConfig(world_size=8, tp=2))
    assert _strategy(model.text_decoder.logits_matmul) == ((4, 1), (2, 1))


def test_pipeline_stages_follow_the_layer_lists():
    d = Qwen2_5_VLConfig.preset("tiny").to_dict()
    d["text"]["num_hidden_layers"] = 5
    d["vision"].update(depth=4, fullatt_block_indexes=[3])
    config = Qwen2_5_VLConfig.from_dict(d)
    pc = ParallelConfig(world_size=8, pp=4, llm_pp_layers=[[1, 2, 1, 1]], vit_pp_layers=[[3, 1, 0, 0]])
    model = parallelize(Qwen2_5_VLForConditionalGeneration(config), pc)
    assert [b.pipeline_stage for b in model.image_encoder.encoder.blocks.layers] == [0, 0, 0, 1]
    assert model.image_encoder.projector.pipeline_stage == 1  # after the last vision block
    assert [l.pipeline_stage for l in model.text_decoder.decoder.layers] == [0, 1, 1, 2, 3]
    assert model.text_decoder.embedding.pipeline_stage == 0
    assert model.text_decoder.decoder.final_layernorm.pipeline_stage == 3
    assert model.text_decoder.output_layer.pipeline_stage == 3


def test_parallelize_checks_before_touching_the_model():
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.preset("tiny"))
    with pytest.raises(ParallelConfigError, match="tp=4 does not divide text.num_key_value_heads=2"):
        parallelize(model, ParallelConfig(world_size=8, tp=4))
    assert _strategy(model.text_decoder.decoder.layers[0].self_attention.linear_qkv.matmul) is None


def test_the_converter_splits_by_the_plans_table():
    """One TP table per family: the converter's split rules are the plan module's (Qwen2.5-VL, DeepSeek-VL2
    with MLA and with MHA, whose linear_qkv is column-parallel); the compiled layouts are checked against
    the same table in tests/test_dryrun_trainer.py."""
    import importlib

    from convert.framework import spec_tp_rules
    from ms_mm import registry

    mla = registry.get("deepseek_vl2").presets["tiny-deepseek"]()
    mha = registry.get("deepseek_vl2").presets["tiny-deepseek"]()
    mha.language_config.use_mla = False
    for name, config in (("qwen2_5_vl", registry.get("qwen2_5_vl").presets["tiny"]()), ("deepseek_vl2", mla),
                         ("deepseek_vl2", mha)):
        rules = importlib.import_module(f"ms_mm.models.{name}.parallelize").tp_rules(config)
        assert spec_tp_rules(registry.get(name).spec(), config) == rules and rules
    assert len(importlib.import_module("ms_mm.models.deepseek_vl2.parallelize").tp_rules(mha)) == \
        len(importlib.import_module("ms_mm.models.deepseek_vl2.parallelize").tp_rules(mla)) + 1

"""ParallelConfig: size arithmetic, pipeline layer lists and the checks against a Qwen2.5-VL config."""
import json

import pytest

from ms_mm.models.qwen2_5_vl import Qwen2_5_VLConfig
from ms_mm.parallel import ParallelConfig, ParallelConfigError
from ms_mm.parallel.config import even_split


def test_dp_is_derived_from_world_size():
    pc = ParallelConfig(world_size=16, tp=2, pp=2)
    assert pc.dp == 4
    assert ParallelConfig(world_size=8).dp == 8
    assert ParallelConfig(world_size=8, tp=2, cp=2).dp == 2


def test_world_size_not_divisible_names_the_sizes():
    with pytest.raises(ParallelConfigError, match=r"world_size=8 is not divisible by tp\*pp\*cp = 3\*1\*1 = 3"):
        ParallelConfig(world_size=8, tp=3)
    with pytest.raises(ParallelConfigError, match=r"world_size=12 is not divisible by tp\*pp\*cp = 2\*4\*1 = 8"):
        ParallelConfig(world_size=12, tp=2, pp=4)


def test_explicit_dp_must_match():
    assert ParallelConfig(world_size=8, tp=2, dp=4).dp == 4
    with pytest.raises(ParallelConfigError, match=r"dp=2 does not match world_size / \(tp\*pp\*cp\) = 8 / 2 = 4"):
        ParallelConfig(world_size=8, tp=2, dp=2)


@pytest.mark.parametrize("name,value", [("tp", 0), ("pp", -1), ("world_size", 2.0), ("ep", True), ("cp", "2")])
def test_sizes_must_be_positive_ints(name, value):
    with pytest.raises(ParallelConfigError, match=rf"{name}={value!r} must be a positive int"):
        ParallelConfig(**{"world_size": 8, name: value})


def test_ep_must_divide_dp():
    assert ParallelConfig(world_size=8, tp=2, ep=4).ep == 4
    with pytest.raises(ParallelConfigError, match=r"ep=3 does not divide the data-parallel size dp=4"):
        ParallelConfig(world_size=8, tp=2, ep=3)


def test_pp_layer_lists_flat_and_nested():
    pc = ParallelConfig(world_size=8, pp=4, llm_pp_layers=[[1, 10, 10, 7]], vit_pp_layers=[32, 0, 0, 0])
    assert pc.llm_pp_layers == [1, 10, 10, 7]
    assert pc.vit_pp_layers == [32, 0, 0, 0]
    with pytest.raises(ParallelConfigError, match=r"llm_pp_layers=\[1, 10, 17\] has 3 stage\(s\) but pp=4"):
        ParallelConfig(world_size=8, pp=4, llm_pp_layers=[1, 10, 17])
    with pytest.raises(ParallelConfigError, match="virtual pipeline is not supported"):
        ParallelConfig(world_size=8, pp=2, llm_pp_layers=[[1, 2], [3, 4]])
    with pytest.raises(ParallelConfigError, match="expected a list of non-negative ints"):
        ParallelConfig(world_size=8, pp=2, vit_pp_layers=[32, -1])


def test_stage_layers_sum_and_defaults():
    pc = ParallelConfig(world_size=8, pp=4, llm_pp_layers=[1, 10, 10, 7])
    assert pc.stage_layers("llm_pp_layers", 28) == [1, 10, 10, 7]
    with pytest.raises(ParallelConfigError, match=r"llm_pp_layers=\[1, 10, 10, 7\] sums to 28 layers but the model has 36"):
        pc.stage_layers("llm_pp_layers", 36)
    assert pc.stage_layers("vit_pp_layers", 32, default_all_first=True) == [32, 0, 0, 0]
    assert ParallelConfig(world_size=4, pp=4).stage_layers("llm_pp_layers", 30) == [8, 8, 7, 7]
    assert even_split(5, 2) == [3, 2]


def test_from_megatron_names():
    pc = ParallelConfig.from_megatron(world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                      llm_pp_layers=[[14, 14]])
    assert (pc.tp, pc.pp, pc.dp, pc.llm_pp_layers) == (2, 2, 2, [14, 14])
    assert json.loads(json.dumps(pc.to_dict()))["dp"] == 2


# ------------------------------------------------------------------------------ against the model
def test_qwen_7b_accepts_the_guide_plans():
    config = Qwen2_5_VLConfig.preset("7b")
    for tp in (1, 2, 4):
        ParallelConfig(world_size=8, tp=tp).check_model(config)
    ParallelConfig(world_size=8, tp=1, pp=4, llm_pp_layers=[[1, 10, 10, 7]],
                   vit_pp_layers=[[32, 0, 0, 0]]).check_model(config)


def test_tp_not_dividing_kv_heads_names_parameter_and_shape():
    config = Qwen2_5_VLConfig.preset("7b")  # 28 heads, 4 KV heads, head_dim 128
    with pytest.raises(ParallelConfigError) as err:
        ParallelConfig(world_size=14, tp=7).check_model(config)  # 7 divides the 28 heads, not the 4 groups
    msg = str(err.value)
    assert "tp=7 does not divide text.num_key_value_heads=4" in msg
    assert "text_decoder.decoder.layers.*.self_attention.linear_qkv.weight has shape [4608, 3584]" in msg


def test_tp_not_dividing_heads_and_vocab():
    tiny = Qwen2_5_VLConfig.preset("tiny")  # 4 heads, 2 KV heads, vocab 384
    with pytest.raises(ParallelConfigError, match=r"tp=4 does not divide text.num_key_value_heads=2"):
        ParallelConfig(world_size=8, tp=4).check_model(tiny)
    d = tiny.to_dict()
    d["text"]["vocab_size"] = 385
    odd_vocab = Qwen2_5_VLConfig.from_dict(d)
    with pytest.raises(ParallelConfigError,
                       match=r"tp=2 does not divide text.vocab_size=385 \(text_decoder.embedding.word_embeddings."
                             r"weight has shape \[385, 64\]"):
        ParallelConfig(world_size=8, tp=2).check_model(odd_vocab)
    d = tiny.to_dict()
    d["text"]["intermediate_size"] = 130
    with pytest.raises(ParallelConfigError, match=r"tp=4 does not divide text.intermediate_size=130 .*"
                                                  r"linear_fc2.weight has shape \[64, 130\]"):
        d["text"]["num_key_value_heads"] = 4
        ParallelConfig(world_size=8, tp=4).check_model(Qwen2_5_VLConfig.from_dict(d))


def test_vision_heads_checked():
    d = Qwen2_5_VLConfig.preset("tiny").to_dict()
    d["vision"].update(num_heads=1, hidden_size=32)
    with pytest.raises(ParallelConfigError, match=r"tp=2 does not divide vision.num_heads=1 "
                                                  r"\(image_encoder.encoder.blocks.layers.\*.self_attention"
                                                  r".linear_qkv.weight has shape \[96, 32\]"):
        ParallelConfig(world_size=8, tp=2).check_model(Qwen2_5_VLConfig.from_dict(d))


def test_pp_layers_must_sum_to_model_depth():
    config = Qwen2_5_VLConfig.preset("7b")
    with pytest.raises(ParallelConfigError, match=r"llm_pp_layers=\[1, 10, 10, 8\] sums to 29 layers but the model has 28"):
        ParallelConfig(world_size=8, pp=4, llm_pp_layers=[1, 10, 10, 8]).check_model(config)
    with pytest.raises(ParallelConfigError, match=r"vit_pp_layers=\[30, 0, 0, 0\] sums to 30 layers but the model has 32"):
        ParallelConfig(world_size=8, pp=4, vit_pp_layers=[30, 0, 0, 0]).check_model(config)


def test_dense_model_refuses_ep_and_cp():
    config = Qwen2_5_VLConfig.preset("tiny")
    with pytest.raises(ParallelConfigError, match="ep=2: Qwen2.5-VL has no experts"):
        ParallelConfig(world_size=8, ep=2).check_model(config)
    with pytest.raises(ParallelConfigError, match="cp=2: context parallel is not implemented"):
        ParallelConfig(world_size=8, cp=2).check_model(config)

"""The Lumina-mGPT 2.0 "7B" preset against upstream's published numbers.

Every expected value below is copied from an upstream file (named on its line), not from our code:
  MS-MM  = Ascend/MindSpeed-MM examples/lumina/mgpt2/model.json (commit 624876af), its "predictor" block
           and top-level "z_loss_weight";
  MS-MMA = Ascend/MindSpeed-MM mindspeed_mm/models/predictor/dits/lumina_mgpt2.py (ChameleonAttention);
  MS-MMI = Ascend/MindSpeed-MM mindspeed_mm/data/data_utils/lumina_item_processor.py (LoadFeatureItemProcessor);
  LUM-IS = Alpha-VLLM/Lumina-mGPT-2.0 lumina_mgpt/inference_solver.py (decode_ids, generate, the logits processor);
  LUM-IP = Alpha-VLLM/Lumina-mGPT-2.0 lumina_mgpt/data/item_processor.py (FlexARItemProcessor.get_image_token);
  LUM-TR = Alpha-VLLM/Lumina-mGPT-2.0 lumina_mgpt/scripts/train.sh.
"""
import pytest

from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config

UPSTREAM_7B = {
    "vocab_size": 171385,               # MS-MM "vocab_size"
    "max_position_embeddings": 10240,   # MS-MM "max_position_embeddings" (LUM-IS generate: max_gen_len=10240)
    "hidden_size": 4096,                # MS-MM "hidden_size"
    "intermediate_size": 11008,         # MS-MM "intermediate_size"
    "num_hidden_layers": 32,            # MS-MM "num_layers"
    "num_attention_heads": 32,          # MS-MM "num_heads"
    "num_key_value_heads": 32,          # MS-MM "num_key_value_heads"
    "rms_norm_eps": 1e-05,              # MS-MM "rms_norm_eps"
    "rope_theta": 10000.0,              # MS-MM "rope_theta"
    "rope_scaling": None,               # MS-MM "rope_scaling": null
    "swin_norm": False,                 # MS-MM "swin_norm"
    "attention_bias": False,            # MS-MM "attention_bias"
    "attention_dropout": 0.0,           # MS-MM "attention_dropout"
    "mlp_bias": False,                  # MS-MM "mlp_bias"
    "hidden_act": "silu",               # MS-MM "hidden_act"
    "tie_word_embeddings": False,       # MS-MM "tie_word_embeddings"
    "dropout": 0.0,                     # MS-MM "dropout": 0.00
    "mask_image_logits": False,         # MS-MM "mask_image_logits"
    "pad_token_id": None,               # MS-MM "pad_token_id": null
    "bos_token_id": 1,                  # MS-MM "bos_token_id"
    "eos_token_id": 2,                  # MS-MM "eos_token_id"
    "z_loss_weight": 1e-05,             # MS-MM top-level "z_loss_weight"; LUM-TR z_loss_weight=1e-5
    "model_parallel_size": 1,           # MS-MMA: self.model_parallel_size = 1
}

UPSTREAM_7B_TOKENS = {
    "image_start_id": 151665,           # LUM-IS decode_ids: `if token_id == 151665` opens an image
    "image_end_id": 151666,             # LUM-IS eos_token_id=[151666]; MS-MMI image_end_token_id = 151666  # <eoss>
    "newline_id": 151670,               # LUM-IS decode_ids drops 151670 between the codes
    "code_offset": 155000,              # LUM-IP get_image_token: img_token + 155000
    "codebook_size": 171383 - 155000 + 1,  # LUM-IS image_token_list = range(155000, 171383 + 1)
}


@pytest.mark.parametrize("field", sorted(UPSTREAM_7B))
def test_7b_preset_field_is_upstreams(field):
    assert getattr(LuminaMGPT2Config.preset("7B"), field) == UPSTREAM_7B[field]


@pytest.mark.parametrize("field", sorted(UPSTREAM_7B_TOKENS))
def test_7b_preset_image_ids_are_upstreams(field):
    assert getattr(LuminaMGPT2Config.preset("7B").tokens, field) == UPSTREAM_7B_TOKENS[field]


def test_7b_preset_derived_shapes():
    big = LuminaMGPT2Config.preset("7B")
    assert big.head_dim == 4096 // 32
    # the last image code (LUM-IS: 171383) fits the vocabulary, with MS-MM's one id to spare
    assert big.tokens.code_offset + big.tokens.codebook_size - 1 == 171383 < big.vocab_size

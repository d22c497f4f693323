"""MindSpeed-MM's own Lumina model.json (nested under "predictor") and our flat form, read into configs.

The nested fixture is upstream's file itself (tests/fixtures/lumina_mgpt2_mindspeed/, source commit in its
README); the expected config is the "7B" preset, whose every number tests/test_lumina_presets.py checks
against upstream. How each key is read follows MindSpeed-MM's code at that commit:
  mindspeed_mm/models/lumina_model.py: ChameleonForConditionalGeneration(**config["predictor"]),
    z_loss_weight = config.pop("z_loss_weight", 1e-5);
  mindspeed_mm/models/predictor/dits/lumina_mgpt2.py: num_layers / num_heads are the layer and head counts,
    model_parallel_size = 1 and mask_image_logits = False hard-coded, RotaryEmbedding without scaling,
    an untied lm_head; the vocabulary map is config.json's "vocabulary_map" under vocabulary_map_path;
  mindspeed_mm/patchs/patch_manager.py: a "patch" key is applied only when its value is truthy.
"""
import copy
import json
from pathlib import Path

import pytest

from ms_mm import registry
from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config, config_from_json, mindspeed_model_json

FIXTURE = Path(__file__).parent / "fixtures" / "lumina_mgpt2_mindspeed" / "model.json"


@pytest.fixture()
def checkpoint_dir(tmp_path):
    """A checkpoint directory whose config.json carries the 2.0 release's image-layout names at the ids
    upstream publishes (Lumina-mGPT-2.0 inference_solver.py: 151665 opens an image, 151666 <eoss> ends it,
    151670 ends a row, codes 155000..171383), and architecture values the model.json must override."""
    vocab = {"<racm3:break>": 151665, "<eoss>": 151666, "<reserved08799>": 151670}
    vocab.update({f"<MOVQGAN{c}>": 155000 + c for c in range(171383 - 155000 + 1)})
    hf = {"model_type": "chameleon", "vocabulary_map": vocab,
          # all different from the model.json's: its values must win (or MindSpeed-MM's fixed ones)
          "vocab_size": 171385, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "dropout": 0.05, "mask_image_logits": True, "rope_scaling": {"type": "linear", "factor": 2.0},
          "tie_word_embeddings": True, "model_parallel_size": 2, "z_loss_weight": 0.5}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf))
    return tmp_path / "ckpt"


def _upstream(checkpoint_dir):
    model_json = json.loads(FIXTURE.read_text())
    assert model_json["predictor"]["vocabulary_map_path"] == "./weights/Lumina/Lumina-mGPT-2.0/"
    model_json["predictor"]["vocabulary_map_path"] = str(checkpoint_dir)
    return model_json


def test_upstream_model_json_is_the_7b_preset(checkpoint_dir):
    config = config_from_json(_upstream(checkpoint_dir))
    assert config.to_dict() == LuminaMGPT2Config.preset("7B").to_dict()


def test_upstream_model_json_is_claimed_by_lumina_and_fsdp1_rides_along(checkpoint_dir):
    model_json = _upstream(checkpoint_dir)
    family = registry.family_for_json(model_json, "model.json")
    assert family.name == "lumina_mgpt2"
    # the fixture's patch.use_fsdp1 is an FSDP config (a non-empty dict): on
    assert config_from_json(model_json).fsdp1 == {"sharding_strategy": "fsdp", "param_dtype": "bf16",
                                                  "reduce_dtype": "fp32", "forward_prefetch": True,
                                                  "backward_prefetch": "backward_pre"}
    for off in ({}, None, False):            # falsy: MindSpeed-MM's patch manager skips it
        model_json["patch"] = {"use_fsdp1": off}
        assert config_from_json(model_json).fsdp1 is None
    del model_json["patch"]
    assert config_from_json(model_json).fsdp1 is None


def test_fsdp1_of_the_nested_form_is_what_the_family_checks(checkpoint_dir):
    """family.check_parallel_sizes refuses FSDP on CPU: on for the fixture, off without the patch."""
    family = registry.get("lumina")
    model_json = _upstream(checkpoint_dir)

    class Args:
        tensor_model_parallel_size = pipeline_model_parallel_size = 1
        use_distributed_optimizer = False

    with pytest.raises(ValueError, match="fsdp1.*CPU"):
        family.check_parallel_sizes(config_from_json(model_json), Args())
    del model_json["patch"]
    family.check_parallel_sizes(config_from_json(model_json), Args())   # nothing to refuse
    assert Args.use_distributed_optimizer is False


def test_nested_z_loss_weight_defaults_as_upstream(checkpoint_dir):
    model_json = _upstream(checkpoint_dir)
    del model_json["z_loss_weight"]
    assert config_from_json(model_json).z_loss_weight == 1e-5   # lumina_model.py: pop("z_loss_weight", 1e-5)
    model_json["z_loss_weight"] = 0.0
    assert config_from_json(model_json).z_loss_weight == 0.0


def test_nested_keys_are_read_under_upstream_names(checkpoint_dir):
    model_json = _upstream(checkpoint_dir)
    p = model_json["predictor"]
    p.update(num_layers=3, num_heads=8, num_key_value_heads=2, hidden_size=512, dropout=0.1, swin_norm=True,
             pad_token_id=0, eos_token_id=7)
    c = config_from_json(model_json)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size) == (3, 8, 2, 512)
    assert (c.dropout, c.swin_norm, c.pad_token_id, c.eos_token_id) == (0.1, True, 0, 7)


@pytest.mark.parametrize("key, value", [("mask_image_logits", True), ("tie_word_embeddings", True),
                                        ("rope_scaling", {"type": "linear", "factor": 2.0}),
                                        ("model_parallel_size", 2)])
def test_nested_values_upstream_would_ignore_are_refused(checkpoint_dir, key, value):
    model_json = _upstream(checkpoint_dir)
    model_json["predictor"][key] = value
    with pytest.raises(ValueError, match=rf"predictor\.{key} .*MindSpeed-MM's Lumina model always uses"):
        config_from_json(model_json)


def test_nested_unknown_keys_are_named(checkpoint_dir):
    model_json = _upstream(checkpoint_dir)
    model_json["predictor"]["num_hidden_layers"] = 32   # the HF name, not MindSpeed-MM's num_layers
    with pytest.raises(ValueError, match=r"predictor: unknown key\(s\) \['num_hidden_layers'\]"):
        config_from_json(model_json)
    model_json = _upstream(checkpoint_dir)
    model_json["patch"]["adaptive_clip_grad_norm"] = True
    with pytest.raises(ValueError, match="patch: only \"use_fsdp1\" is read"):
        config_from_json(model_json)
    model_json = _upstream(checkpoint_dir)
    model_json["fsdp1"] = {}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['fsdp1'\] beside \"predictor\""):
        config_from_json(model_json)


def test_nested_missing_checkpoint_names_the_key(tmp_path):
    model_json = json.loads(FIXTURE.read_text())
    model_json["predictor"]["vocabulary_map_path"] = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="predictor.vocabulary_map_path .*nowhere: no config.json there"):
        config_from_json(model_json)


def test_flat_form_still_reads(checkpoint_dir):
    """The flat form (the nested predictor's keys, z_loss_weight and our switches at the top) gives the same."""
    upstream = _upstream(checkpoint_dir)
    flat = {k: v for k, v in upstream["predictor"].items()
            if k not in ("bos_token_id", "eos_token_id", "initializer_range", "rope_scaling", "tie_word_embeddings")}
    flat.update(model_id="lumina", z_loss_weight=upstream["z_loss_weight"], mask_image_logits=False,
                model_parallel_size=1, fsdp1={})
    config = config_from_json(copy.deepcopy(flat))
    expected = LuminaMGPT2Config.preset("7B").to_dict()
    # the flat form names no rope_scaling / tie_word_embeddings: those stay the checkpoint config.json's
    expected.update(rope_scaling={"type": "linear", "factor": 2.0}, tie_word_embeddings=True)
    assert config.to_dict() == expected
    assert config.fsdp1 == {}                  # flat: present (even empty) = on
    assert registry.family_for_json(flat, "model.json").name == "lumina_mgpt2"
    # and our writer's flat json reads back to the same config
    assert config_from_json(mindspeed_model_json(config, checkpoint_dir)).to_dict() == expected

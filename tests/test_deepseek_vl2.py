"""DeepSeek-VL2 fp32 parity against the upstream reference fixtures, plus the host-side pieces.

The fixtures (../shared/fixtures/deepseek_vl2/{forward,forward_mha}) were produced by the official
deepseek-ai/DeepSeek-VL2 code in training mode. Weights are loaded through the project's converter
(`convert.load_hf_as_mm` with `adapters/deepseek_vl2.py`), the model runs in graph mode, and the
gradients are mapped back to checkpoint names with `convert.mm_grads_to_hf`.
Tolerances are the fixture README's: activations atol = rtol = 1e-4, scalar losses 1e-5,
gradients atol 1e-5 + rtol 1e-3, routing indices exact.
"""
import json

import numpy as np
import pytest

from ms_mm.models.deepseek_vl2.parity import parity_outputs
from convert import load_hf_as_mm, mm_grads_to_hf, mm_state_to_hf
from ms_mm.models.deepseek_vl2.processing import tile_image
from ms_mm.models.deepseek_vl2 import DeepseekVL2Config, build_model_inputs, num_image_tokens

CASES = ("forward", "forward_mha")


def _close(got, ref, atol, rtol, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs reference {ref.shape}"
    err = np.abs(got - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} outside atol={atol} rtol={rtol}, max |diff| {err.max():.3g}"


def _load(fixture_root, case):
    d = fixture_root / "deepseek_vl2" / case
    config, state = load_hf_as_mm(d / "hf", "deepseek_vl2")
    return config, state, dict(np.load(d / "inputs.npz")), dict(np.load(d / "outputs.npz"))


def test_parity_forward_backward(fixture_root):
    """MLA fixture: graph-mode forward + both backward passes (CE + aux, CE only), against every
    array of the fixture's outputs.npz."""
    config, state, inputs, ref = _load(fixture_root, "forward")
    out, grads = parity_outputs(config, state, inputs, gradients=("grad", "grad_ce_only"))

    _close(out["logits"], ref["logits"], 1e-4, 1e-4, "logits")
    _close(out["loss"], ref["loss"], 1e-5, 0, "CE loss")
    _close(out["images_embeds"], ref["images_embeds"], 1e-4, 1e-4, "images_embeds")
    _close(out["inputs_embeds"], ref["inputs_embeds"], 1e-4, 1e-4, "inputs_embeds")
    np.testing.assert_array_equal(out["moe.layer1.topk_idx"], ref["moe.layer1.topk_idx"])
    _close(out["moe.layer1.topk_weight"], ref["moe.layer1.topk_weight"], 1e-5, 1e-4, "topk_weight")
    _close(out["moe.layer1.aux_loss"], ref["moe.layer1.aux_loss"], 1e-6, 0, "layer-1 aux loss")
    assert set(out) == {k for k in ref if not k.startswith("grad")}

    checked = 0
    for kind in ("grad", "grad_ce_only"):
        hf_grads = mm_grads_to_hf("deepseek_vl2", config, grads[kind])
        for key in ref:
            if key.startswith(kind + "."):
                _close(hf_grads[key[len(kind) + 1:]], ref[key], 1e-5, 1e-3, key)
                checked += 1
    assert checked == 10


def test_capacity_dispatch_that_drops_nothing_matches_the_fixture(fixture_root):
    """The capacity dispatch (``moe_expert_capacity_factor``) with room for every token (factor E / k):
    the upstream fixture's logits, loss and gradients, as the dropless paths."""
    config, state, inputs, ref = _load(fixture_root, "forward")
    lc = config.language_config
    lc.moe_expert_capacity_factor = lc.n_routed_experts / lc.num_experts_per_tok
    out, grads = parity_outputs(config, state, inputs, gradients=("grad",))
    _close(out["logits"], ref["logits"], 1e-4, 1e-4, "logits")
    _close(out["loss"], ref["loss"], 1e-5, 0, "CE loss")
    hf_grads = mm_grads_to_hf("deepseek_vl2", config, grads["grad"])
    checked = [key for key in ref if key.startswith("grad.")]
    for key in checked:
        _close(hf_grads[key[len("grad."):]], ref[key], 1e-5, 1e-3, key)
    assert any("experts" in key for key in checked), checked


@pytest.mark.parametrize("case", CASES)
def test_tiling_matches_processor(fixture_root, case):
    """Dynamic tiling of image.png reproduces the processor's tiles, grid and image-token count."""
    from PIL import Image

    d = fixture_root / "deepseek_vl2" / case
    config = DeepseekVL2Config.preset("tiny")
    inputs = dict(np.load(d / "inputs.npz"))
    with Image.open(d / "image.png") as img:
        tiles, (tw, th) = tile_image(img, config.vision_config.image_size, config.candidate_resolutions)
    tiles = np.stack(tiles)
    assert [tw, th] == inputs["images_spatial_crop"][0, 0].tolist()
    np.testing.assert_array_equal(tiles, inputs["images"][0])  # processor outputs are exact
    assert num_image_tokens(tw, th, config) == int(inputs["images_seq_mask"][0].sum())


def test_converter_round_trip_and_config(fixture_root, tmp_path):
    from safetensors.numpy import load_file

    from convert import hf_to_mm, mm_to_hf

    d = fixture_root / "deepseek_vl2" / "forward" / "hf"
    config, state = load_hf_as_mm(d, "deepseek_vl2")
    back = mm_state_to_hf("deepseek_vl2", config, state)
    orig = load_file(str(d / "model.safetensors"))
    assert set(back) == set(orig)
    for k, v in orig.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # through an MM checkpoint split over tp 2 x pp 2 and back (the mm-convert actions)
    hf_to_mm(d, tmp_path / "mm", "DeepSeekVLConverter", tp_size=2, pp_layers={"vit": [[2, 0]], "llm": [[1, 1]]},
             trust_remote_code=True)
    mm_to_hf(tmp_path / "mm", d, tmp_path / "hf", "deepseek_vl2", trust_remote_code=True)
    again = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(again) == set(orig)
    for k, v in orig.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)
    # the fixture is the "tiny" preset
    tiny = DeepseekVL2Config.preset("tiny")
    assert config.language_config == tiny.language_config
    assert config.vision_config == tiny.vision_config
    assert config.projector_config == tiny.projector_config
    assert config.candidate_resolutions == tiny.candidate_resolutions


def test_config_errors_name_the_field():
    base = DeepseekVL2Config.preset("tiny").to_dict()
    bad = json.loads(json.dumps(base))
    bad["language_config"]["scoring_func"] = "tanh"
    with pytest.raises(ValueError, match=r"language_config\.scoring_func='tanh'.*unknown MoE scoring"):
        DeepseekVL2Config.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["candidate_resolutions"][1] = [70, 100]
    with pytest.raises(ValueError, match=r"candidate_resolutions\[1\]"):
        DeepseekVL2Config.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["language_config"]["topk_method"] = "group_limited_greedy"
    bad["language_config"]["n_group"] = 3
    with pytest.raises(ValueError, match=r"n_routed_experts=4 is not divisible by n_group=3"):
        DeepseekVL2Config.from_dict(bad)
    with pytest.raises(ValueError, match=r"language_config: unknown field\(s\) \['hidden'\]"):
        DeepseekVL2Config.from_dict({"language_config": {"hidden": 3}})
    for name in ("Tiny", "Small", "Base"):
        DeepseekVL2Config.preset(name)  # released presets validate


def test_bad_batch_is_named(fixture_root):
    config = DeepseekVL2Config.preset("tiny")
    inputs = dict(np.load(fixture_root / "deepseek_vl2" / "forward" / "inputs.npz"))
    inputs["images_seq_mask"] = inputs["images_seq_mask"].copy()
    inputs["images_seq_mask"][0, 1] = True
    with pytest.raises(ValueError, match=r"sample 0 has \d+ positions in images_seq_mask"):
        build_model_inputs(inputs, config)
    with pytest.raises(KeyError, match="images_spatial_crop"):
        build_model_inputs({k: v for k, v in inputs.items() if k != "images_spatial_crop"}, config)
    text_only = build_model_inputs({"input_ids": inputs["input_ids"]}, config)
    assert not text_only["images_seq_mask"].any() and text_only["pixel_values"].shape == (1, 3, 70, 70)


def test_mm_parity_cli_path(fixture_root):
    """MHA fixture through the ``mm-parity`` machinery (runner + its comparison), all reference keys."""
    from convert import parity

    d = fixture_root / "deepseek_vl2" / "forward_mha"
    ref = dict(np.load(d / "outputs.npz"))
    grad_names = [k[len("grad."):] for k in ref if k.startswith("grad.")]
    out = parity.run_parity("deepseek_vl2", str(d / "hf"), dict(np.load(d / "inputs.npz")), grad_names)
    rows = parity.compare(out, ref)
    assert {k for k, _, _ in rows} == {k for k in ref if not k.startswith("grad_ce_only.")}
    bad = [r for r in rows if not r[1]]
    assert not bad, bad



def test_routed_experts_portable_dispatch():
    """ms_mm.ops.moe.RoutedExperts == sum_k w_k * SwiGLU_{e_k}(x), computed token by token in numpy."""
    import mindspore as ms

    from ms_mm.training.weights import load_state_dict
    from ms_mm.ops.moe import RoutedExperts

    rng = np.random.default_rng(7)
    n_exp, hidden, inter, tokens, k = 5, 8, 6, 11, 3
    experts = RoutedExperts(n_exp, hidden, inter)
    state = {p.name: rng.standard_normal(p.shape).astype(np.float32) * 0.3 for p in experts.get_parameters()}
    load_state_dict(experts, state)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    idx = np.stack([rng.permutation(n_exp)[:k] for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, k)).astype(np.float32)
    got = experts(ms.Tensor(x), ms.Tensor(idx), ms.Tensor(w)).asnumpy()

    def swiglu(e, v):
        fc1 = state["linear_fc1.weight"][e]
        h = fc1 @ v
        gate, up = h[:inter], h[inter:]
        return state["linear_fc2.weight"][e] @ (gate / (1 + np.exp(-gate)) * up)

    want = np.stack([sum(w[t, j] * swiglu(idx[t, j], x[t]) for j in range(k)) for t in range(tokens)])
    _close(got, want, 1e-5, 1e-5, "routed experts")


def test_mindspeed_model_json_maps_to_base_preset():
    """The fields of MindSpeed-MM's examples/deepseekvl2/model.json (DeepSeek-VL2 Base; MLA sizes on
    its command line) give our Base preset."""
    from ms_mm.models.deepseek_vl2.config import config_from_mindspeed

    model_json = {
        "model_id": "DeepSeek-VL2",
        "text_decoder": {"num_layers": 30, "hidden_size": 2560, "num_attention_heads": 32, "num_query_groups": 32,
                         "ffn_hidden_size": 12288, "moe_intermediate_size": 1536, "kv_channels": 128,
                         "layernorm_epsilon": 1e-06, "vocab_size": 129280, "rotary_base": 10000,
                         "max_position_embeddings": 4096, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                         "num_moe_experts": 72, "n_shared_experts": 2, "n_group": 1, "topk_group": 1,
                         "norm_topk_prob": True, "moe_router_topk": 6, "moe_router_load_balancing_type": "noaux_tc",
                         "moe_router_score_function": "sigmoid", "routed_scaling_factor": 2.0},
        "image_encoder": {"tile_tag": "2D", "global_view_pos": "head",
                          "vision_encoder": {"model_id": "SigLip", "model_name": "siglip_so400m_patch14_384",
                                             "image_size": 384, "select_layer": -1},
                          "vision_projector": {"projector_type": "downsample_mlp_gelu", "input_dim": 1152,
                                               "n_embed": 2560, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2}},
    }
    got = config_from_mindspeed(model_json)
    base = DeepseekVL2Config.preset("Base")
    assert got.vision_config == base.vision_config
    assert got.projector_config == base.projector_config
    assert got.language_config == base.language_config
    assert got.candidate_resolutions == base.candidate_resolutions
    model_json["image_encoder"]["vision_encoder"]["select_layer"] = -2  # penultimate block's features
    assert config_from_mindspeed(model_json).vision_config.layers == 26
    model_json["image_encoder"]["vision_encoder"]["model_name"] = "siglip_huge"
    with pytest.raises(ValueError, match=r"vision_encoder\.model_name='siglip_huge'"):
        config_from_mindspeed(model_json)

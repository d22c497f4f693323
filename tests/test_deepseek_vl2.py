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

import mindspore as ms

from convert import load_hf_as_mm, mm_grads_to_hf, mm_state_to_hf
from ms_mm.models.deepseek_vl2 import (MODEL_INPUT_NAMES, DeepseekVL2Config, DeepseekVL2ForCausalLM,
                                       build_model_inputs, num_image_tokens, tile_image)

CASES = ("forward", "forward_mha")


def _close(got, ref, atol, rtol, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs reference {ref.shape}"
    err = np.abs(got - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} outside atol={atol} rtol={rtol}, max |diff| {err.max():.3g}"


@pytest.fixture
def graph_mode():
    old = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=old)


def _load(fixture_root, case):
    d = fixture_root / "deepseek_vl2" / case
    config, state = load_hf_as_mm(d / "hf", "deepseek_vl2")
    model = DeepseekVL2ForCausalLM(config)
    params = {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in state.items()}
    not_loaded, unused = ms.load_param_into_net(model, params, strict_load=True)
    assert not not_loaded and not unused, (not_loaded, unused)
    inputs = dict(np.load(d / "inputs.npz"))
    outputs = dict(np.load(d / "outputs.npz"))
    return config, model, inputs, outputs


@pytest.mark.parametrize("case", CASES)
def test_parity_forward_backward(fixture_root, graph_mode, case):
    config, model, inputs, ref = _load(fixture_root, case)
    feed = build_model_inputs(inputs, config)
    args = [ms.Tensor(feed[k]) for k in MODEL_INPUT_NAMES]
    weights = model.trainable_params()

    # objective = CE + sum(aux): the gradient upstream gets through AddAuxiliaryLoss
    def objective(*a):
        return model(*a)

    grad_total = ms.value_and_grad(objective, None, weights, has_aux=True)
    (loss, logits, ce, aux, routing), grads = grad_total(*args)
    _close(logits.asnumpy(), ref["logits"], 1e-4, 1e-4, "logits")
    _close(ce.asnumpy(), ref["loss"], 1e-5, 0, "CE loss")
    _close(aux.asnumpy()[0], ref["moe.layer1.aux_loss"], 1e-6, 0, "layer-1 aux loss")
    _close(loss.asnumpy(), ref["loss"] + ref["moe.layer1.aux_loss"], 1e-5, 0, "objective")
    idx = np.sort(routing.asnumpy()[0], axis=-1)  # upstream topk(sorted=False): compare as sets
    np.testing.assert_array_equal(idx, ref["moe.layer1.topk_idx"])

    hf_grads = mm_grads_to_hf("deepseek_vl2", config, {p.name: g.asnumpy() for p, g in zip(weights, grads)})
    checked = 0
    for key in ref:
        if key.startswith("grad."):
            _close(hf_grads[key[len("grad."):]], ref[key], 1e-5, 1e-3, key)
            checked += 1
    assert checked == 5

    def ce_only(*a):
        return model(*a)[2]

    grad_ce = ms.value_and_grad(ce_only, None, weights)
    _, grads = grad_ce(*args)
    hf_grads = mm_grads_to_hf("deepseek_vl2", config, {p.name: g.asnumpy() for p, g in zip(weights, grads)})
    for key in ref:
        if key.startswith("grad_ce_only."):
            _close(hf_grads[key[len("grad_ce_only."):]], ref[key], 1e-5, 1e-3, key)


@pytest.mark.parametrize("case", CASES[:1])
def test_parity_intermediates(fixture_root, case):
    """Projector output, scattered input embeddings and routing weights (PyNative, small)."""
    config, model, inputs, ref = _load(fixture_root, case)
    feed = {k: ms.Tensor(v) for k, v in build_model_inputs(inputs, config).items()}
    tiles = model.image_encoder(feed["pixel_values"])
    _close(tiles.asnumpy(), ref["images_embeds"], 1e-4, 1e-4, "images_embeds")
    embeds = model.embed(feed["input_ids"], feed["pixel_values"], feed["image_token_index"], feed["images_seq_mask"])
    _close(embeds.asnumpy(), ref["inputs_embeds"], 1e-4, 1e-4, "inputs_embeds")

    layers = model.text_decoder.decoder.layers
    x = layers[0](embeds, feed["position_ids"], feed["attention_bias"])[0]
    x = x + layers[1].self_attention(layers[1].input_layernorm(x), feed["position_ids"], feed["attention_bias"])
    idx, weight, _ = layers[1].mlp.router(layers[1].pre_mlp_layernorm(x))
    idx, weight = idx.asnumpy(), weight.asnumpy()
    order = np.argsort(idx, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(idx, order, -1), ref["moe.layer1.topk_idx"])
    _close(np.take_along_axis(weight, order, -1), ref["moe.layer1.topk_weight"], 1e-5, 1e-4, "topk_weight")


@pytest.mark.parametrize("case", CASES)
def test_tiling_matches_processor(fixture_root, case):
    """Dynamic tiling of image.png reproduces the processor's tiles, grid and image-token count."""
    from PIL import Image

    d = fixture_root / "deepseek_vl2" / case
    config = DeepseekVL2Config.preset("tiny")
    inputs = dict(np.load(d / "inputs.npz"))
    with Image.open(d / "image.png") as img:
        tiles, (tw, th) = tile_image(img, config)
    assert [tw, th] == inputs["images_spatial_crop"][0, 0].tolist()
    np.testing.assert_array_equal(tiles, inputs["images"][0])  # processor outputs are exact
    assert num_image_tokens(tw, th, config) == int(inputs["images_seq_mask"][0].sum())


def test_converter_round_trip_and_config(fixture_root):
    from safetensors.numpy import load_file

    d = fixture_root / "deepseek_vl2" / "forward" / "hf"
    config, state = load_hf_as_mm(d, "deepseek_vl2")
    back = mm_state_to_hf("deepseek_vl2", config, state)
    orig = load_file(str(d / "model.safetensors"))
    assert set(back) == set(orig)
    for k, v in orig.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
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

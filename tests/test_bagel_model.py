"""BAGEL-MoT: fp32 parity with the official code (`fixtures/bagel/forward`), the converter round trip and
the config checks. The checkpoint is loaded through the project's converter (`convert.load_hf_as_mm`
inside `ms_mm.models.bagel.parity.run_parity`); the model runs in graph mode."""
import json
from pathlib import Path

import numpy as np
import pytest

import convert
from ms_mm.models.bagel import BagelConfig, build_model_inputs, config_from_hf
from ms_mm.models.bagel.inputs import MASK_VALUE
from ms_mm.training.mm_checkpoint import SafetensorsFile

from conftest import FIXTURE_ROOT

FIXTURE = FIXTURE_ROOT / "bagel" / "forward"   # a missing fixture is an error (conftest), never a skip
# extra cases from the official code (scripts/make_bagel_fixtures.py, its docstring lists what each covers):
# gqa_edit (GQA, 2 ViT images, edit-style clean + noised latents, VAE ch_mult [1, 2] with res blocks,
# timestep_shift 3), mha_freeze_und (freeze_und on, MHA, 2 wider layers, exact-GELU connector, CE text after a
# clean latent, latent_patch_size 1, z 8), interp_vae3 (interpolate_pos on, MQA, 1 layer, 3-level VAE,
# latent / ViT grids larger than the position tables, timestep_shift 2)
SHAPES = Path(__file__).resolve().parent / "fixtures" / "bagel_shapes"
SHAPE_DIRS = [d for d in sorted(SHAPES.iterdir()) if (d / "outputs.npz").is_file()]
CASES = [pytest.param(FIXTURE, id="shared-forward")]
CASES += [pytest.param(d, id=d.name) for d in SHAPE_DIRS]

# (atol, rtol). README suggests activations 1e-4/1e-4, losses 1e-5, gradients 1e-5 + 1e-3; observed here:
# LLM / heads / ViT <= 8.1e-6, VAE <= 2.5e-5, losses <= 1e-6, gradients <= 1.5e-6 -- all but the VAE tighter.
TOL_ACTIVATION = (2e-5, 1e-4)
TOL_VAE = (1e-4, 1e-4)
TOL_LOSS = (5e-6, 0.0)
TOL_GRAD = (5e-6, 1e-3)


def _tolerance(key):
    if key.startswith("grad."):
        return TOL_GRAD
    if key in ("loss", "ce", "mse"):
        return TOL_LOSS
    if key.startswith("vae_"):
        return TOL_VAE
    return TOL_ACTIVATION


def _arrays(case):
    with np.load(case / "inputs.npz") as i, np.load(case / "outputs.npz") as o:
        return {k: i[k] for k in i.files}, {k: o[k] for k in o.files}


@pytest.fixture(scope="module")
def fixture_arrays():
    return _arrays(FIXTURE)


@pytest.mark.parametrize("case", CASES)
def test_parity_every_reference_array(case):
    import mindspore as ms
    from ms_mm.models.bagel.parity import run_parity

    inputs, ref = _arrays(case)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        parity_outputs = run_parity(str(case), inputs, [k[len("grad."):] for k in ref if k.startswith("grad.")])
    finally:
        ms.set_context(mode=previous)
    failures = []
    for key, want in ref.items():
        assert key in parity_outputs, f"run_parity did not produce {key}"
        got = parity_outputs[key]
        assert got.shape == want.shape, f"{key}: shape {got.shape} vs reference {want.shape}"
        atol, rtol = _tolerance(key)
        diff = np.abs(got.astype(np.float64) - want)
        if not np.all(diff <= atol + rtol * np.abs(want)):
            failures.append(f"{key}: max|diff| {diff.max():.3g} (atol {atol}, rtol {rtol})")
        elif key.startswith("grad.") and not np.any(want) and np.any(got):
            # upstream's exact zeros (freeze_und: the detached und side) must be ours too, not merely small
            failures.append(f"{key}: reference gradient is exactly zero, ours reaches {np.abs(got).max():.3g}")
    assert not failures, "; ".join(failures)


def test_case_flags_reach_the_model():
    """The cases' flags travel in the files a user has (freeze_und in llm_config.json, interpolate_pos and
    connector_act in bagel_config.json) through the converter into the config and the built model."""
    from ms_mm.models.bagel.modeling import Bagel

    frozen, _ = convert.load_hf_as_mm(str(SHAPES / "mha_freeze_und"), "bagel")
    assert frozen.llm.freeze_und is True and frozen.interpolate_pos is False and frozen.connector_act == "gelu"
    assert frozen.llm.num_key_value_heads == frozen.llm.num_attention_heads
    cells = [c for _, c in Bagel(frozen).cells_and_names() if hasattr(c, "freeze_und")]
    assert len(cells) == 1 + 2 * frozen.llm.num_hidden_layers and all(c.freeze_und for c in cells)
    interp, _ = convert.load_hf_as_mm(str(SHAPES / "interp_vae3"), "bagel")
    assert interp.interpolate_pos is True and interp.llm.freeze_und is False
    assert (interp.vae.ch_mult, interp.vae.downsample, interp.llm.num_key_value_heads) == ([1, 2, 2], 4, 1)


@pytest.mark.parametrize("case", [pytest.param(d, id=d.name) for d in SHAPE_DIRS])
def test_packer_matches_upstream_packing(case):
    """Our packer (`processing.Packer`), with the data settings the case's config implies (interpolate_pos
    from bagel_config.json, as `build_bagel_dataloader` takes it), packs the case's samples (packing.json,
    packing_images.npz) into upstream's `PackedDataset.pack_sequence` + `to_tensor` batch: every index,
    id, position (interpolated or not), split and ViT patch exactly; the timestep draws are the rng's."""
    import types

    from ms_mm.models.bagel.processing import Packer

    config = config_from_hf(convert.framework.read_hf_config(case, convert.get_spec("bagel")))
    packing = json.loads((case / "packing.json").read_text())
    settings = types.SimpleNamespace(text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.0,
                                     vit_patch_size=config.vit.patch_size,
                                     max_num_patch_per_side=config.vit_max_num_patch_per_side,
                                     max_latent_size=config.max_latent_size,
                                     vae_image_downsample=config.latent_downsample,
                                     interpolate_pos=config.interpolate_pos)
    assert packing["settings"] == {k: getattr(settings, k) for k in packing["settings"]}
    assert packing["interpolate_pos"] is config.interpolate_pos
    special = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image")}
    assert special == packing["special_token_ids"]
    inputs, _ = _arrays(case)
    with np.load(case / "packing_images.npz") as f:
        images = {k: f[k] for k in f.files}
    packer = Packer(settings, special, np.random.default_rng(0))
    for sample in packing["samples"]:
        ours = {"text_ids_list": sample["text_ids_list"], "sequence_plan": sample["sequence_plan"],
                "images": [images[f"{kind}_image_{i}"] for kind, i in sample["images"]]}
        packer.add(ours, {k: 0 for k in packer.used})
    batch = packer.batch()
    for key in ("sequence_length", "sample_lens", "split_lens", "attn_modes", "packed_text_ids", "packed_text_indexes",
                "packed_position_ids", "packed_label_ids", "ce_loss_indexes", "packed_vit_tokens",
                "packed_vit_token_indexes", "packed_vit_position_ids", "vit_token_seqlens",
                "patchified_vae_latent_shapes", "packed_latent_position_ids", "packed_vae_token_indexes",
                "mse_loss_indexes"):
        np.testing.assert_array_equal(batch[key], inputs[key], err_msg=key)
    np.testing.assert_array_equal(np.isfinite(batch["packed_timesteps"]), np.isfinite(inputs["packed_timesteps"]))
    assert np.all(inputs["packed_timesteps"][~np.isfinite(inputs["packed_timesteps"])] == -np.inf)
    padded = inputs["padded_images"]
    assert len(batch["vae_images"]) == padded.shape[0]
    for i, img in enumerate(batch["vae_images"]):
        _, h, w = img.shape
        np.testing.assert_array_equal(padded[i, :, :h, :w], img)
        assert not padded[i, :, h:].any() and not padded[i, :, :, w:].any()


def test_run_parity_rejects_bad_input_key(fixture_arrays):
    from ms_mm.models.bagel.parity import run_parity

    inputs, _ = fixture_arrays
    with pytest.raises(ValueError, match=r"^inputs: unknown key\(s\) \['pixel_values'\]"):
        run_parity(str(FIXTURE), {**inputs, "pixel_values": np.zeros(1)}, [])
    broken = dict(inputs)
    broken.pop("packed_vit_tokens")
    with pytest.raises(ValueError, match=r"^inputs: missing key\(s\) \['packed_vit_tokens'\]"):
        run_parity(str(FIXTURE), broken, [])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("source", ["split_lens", "nested_masks"])
def test_joint_mask_matches_upstream_nested_masks(case, source):
    """The one packed mask (model row order) equals upstream's per-sample masks, block-diagonally, whether
    built from split_lens / attn_modes or taken from the nested masks of upstream's non-flex batch."""
    inputs, _ = _arrays(case)
    config = config_from_hf(convert.framework.read_hf_config(case, convert.get_spec("bagel")))
    batch = dict(inputs)
    if source == "nested_masks":
        del batch["split_lens"], batch["attn_modes"]
    model_inputs = build_model_inputs(batch, config)
    rows = model_inputs["row_of_position"]
    mask = model_inputs["attention_mask"][0, 0][np.ix_(rows, rows)]  # back to packed order
    start = 0
    for i, n in enumerate(inputs["sample_lens"]):
        nested = inputs[f"nested_attention_mask_{i}"]
        block = mask[start:start + n, start:start + n]
        np.testing.assert_array_equal(block == 0, nested == 0)
        np.testing.assert_array_equal(np.delete(mask[start:start + n], np.s_[start:start + n], axis=1),
                                      MASK_VALUE)
        start += n
    # latent rows come last and are the MoT generation tokens
    n_und = inputs["packed_text_indexes"].size + inputs["packed_vit_token_indexes"].size
    assert np.all(rows[inputs["packed_vae_token_indexes"]] >= n_und)


@pytest.mark.parametrize("case", CASES)
def test_hf_mm_hf_round_trip_is_bit_exact(case, tmp_path):
    mm_dir = convert.hf_to_mm(case, tmp_path / "mm", "BagelConverter")
    out = convert.mm_to_hf(tmp_path / "mm", case, tmp_path / "hf", "bagel")
    for fname in ("ema.safetensors", "ae.safetensors"):
        src, dst = SafetensorsFile(case / fname), SafetensorsFile(out / fname)
        assert sorted(src.keys()) == sorted(dst.keys()), fname
        for k in src.keys():
            a, b = src.get(k), dst.get(k)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f"{fname}: {k}"
    assert not (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    for name in ("llm_config.json", "vit_config.json", "ae_config.json", "bagel_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((case / name).read_text())
    assert (tmp_path / "mm" / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert mm_dir.name == "release"


def test_config_presets_forms_and_validation():
    hf = convert.framework.read_hf_config(FIXTURE, convert.get_spec("bagel"))
    tiny = config_from_hf(hf)
    assert tiny.to_dict() == BagelConfig.preset("tiny").to_dict()
    assert tiny.vit.num_hidden_layers == hf["vit_config"]["num_hidden_layers"] - 1  # + 1 + select_layer(-2)
    assert BagelConfig.from_dict(tiny.to_dict()) == tiny
    big = BagelConfig.preset("7B-MoT")
    assert (big.llm.num_hidden_layers, big.llm.hidden_size, big.vit.num_hidden_layers, big.vit.hidden_size,
            big.vae.z_channels, big.patch_latent_dim) == (28, 3584, 26, 1152, 16, 64)
    # the release ships llm_config.json / vit_config.json only (FLUX VAE and inference defaults apply)
    release_llm = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                   "hidden_act": "silu", "tie_word_embeddings": False}
    release_vit = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                   "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 980, "patch_size": 14,
                   "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    assert config_from_hf({"llm_config": release_llm, "vit_config": release_vit}) == big

    def bad(match, **changes):
        d = tiny.to_dict()
        for path, value in changes.items():
            node = d
            *head, last = path.split("__")
            for p in head:
                node = node[p]
            node[last] = value
        with pytest.raises(ValueError, match=match):
            BagelConfig.from_dict(d)

    bad(r"llm\.num_attention_heads=3 is not a multiple of llm\.num_key_value_heads=2", llm__num_key_value_heads=2)
    bad(r"bagel\.vit_max_num_patch_per_side=9 exceeds", vit_max_num_patch_per_side=9)
    bad(r"vae\.downsample=4 does not match ch_mult", vae__downsample=4)
    bad(r"bagel\.connector_act='relu'", connector_act="relu")
    bad(r"bagel\.start_of_image=400", start_of_image=400)
    bad(r"vit\.rope=True", vit__rope=True)
    bad(r"unknown field\(s\) \['hidden'\]", llm__hidden=3)


def test_tp2_pp2_split_and_back_is_bit_exact(tmp_path):
    """TP 2 (qkv / qkv_moe_gen by KV group, gated and plain MLPs, vocab) + PP 2 (generation heads placed
    with the LLM's first / last stage) on the GQA case, merged back to the release files exactly."""
    case = SHAPES / "gqa_edit"
    convert.hf_to_mm(case, tmp_path / "mm", "bagel", tp_size=2, pp_layers={"llm": [1, 2], "vit": [2, 0]})
    last = SafetensorsFile(tmp_path / "mm" / "release" / "mp_rank_01_001" / "model.safetensors")
    assert last.shape("text_decoder.decoder.layers.1.self_attention.linear_qkv_moe_gen.weight") == (32, 32)
    assert "llm2vae.weight" in last.keys() and "vae2llm.weight" not in last.keys()
    out = convert.mm_to_hf(tmp_path / "mm", case, tmp_path / "hf", "bagel")
    for fname in ("ema.safetensors", "ae.safetensors"):
        src, dst = SafetensorsFile(case / fname), SafetensorsFile(out / fname)
        assert sorted(src.keys()) == sorted(dst.keys())
        assert all(src.get(k).tobytes() == dst.get(k).tobytes() for k in src.keys()), fname
    with pytest.raises(convert.ConversionError, match=r"tp_size 2 does not divide the LLM attention heads"):
        convert.hf_to_mm(FIXTURE, tmp_path / "mm3", "bagel", tp_size=2)


def _is_und_weight(name):
    """Upstream's und side of the model: the LLM weights without a `_moe_gen` copy (lm_head aside),
    the text embedding, the ViT and the connector."""
    if name.startswith("image_encoder."):
        return True
    return (name.startswith("text_decoder.") and "_moe_gen" not in name
            and not name.startswith("text_decoder.output_layer."))


def test_freeze_und_detaches_the_und_rows_as_upstream(fixture_arrays):
    """freeze_und (upstream qwen2_navit.py: the und rows of the decoder input, of v, of the normed q / k,
    of the attention and MLP outputs and of the final norm are detached). On the shared fixture (no
    token attends to the noised latents, so CE depends on und weights only and MSE reaches the und
    weights only through the detached k / v): the forward is the reference's; every und weight gets an
    exactly zero gradient; every gen weight still gets one; the heads after the final norm (llm2vae,
    lm_head) get the gradients they get without freezing (llm2vae: the reference's). The other gen
    gradients change: the noise split's own <soi> / <eoi> tokens are und rows that attend to the
    latents, and the latents attend back to their (now constant) keys and values."""
    import mindspore as ms

    from ms_mm.models.bagel.inputs import MODEL_INPUT_NAMES
    from ms_mm.models.bagel.modeling import Bagel
    from ms_mm.training.weights import load_state_dict

    inputs, ref = fixture_arrays
    config, state = convert.load_hf_as_mm(str(FIXTURE), "bagel")
    model_inputs = build_model_inputs(inputs, config)
    args = [ms.Tensor(model_inputs[k]) for k in MODEL_INPUT_NAMES]
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    runs = {}
    try:
        for freeze in (False, True):
            config.llm.freeze_und = freeze
            net = Bagel(config)
            load_state_dict(net, state)
            weights = net.trainable_params()
            results, grads = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))(*args)
            runs[freeze] = ([r.asnumpy() for r in results], {p.name: g.asnumpy() for p, g in zip(weights, grads)})
    finally:
        ms.set_context(mode=previous)
        config.llm.freeze_und = False
    (out_free, g_free), (out_frozen, g_frozen) = runs[False], runs[True]
    for a, b in zip(out_free, out_frozen):
        np.testing.assert_array_equal(a, b)                       # stop_gradient changes no value
    np.testing.assert_allclose(out_frozen[0], ref["loss"], atol=TOL_LOSS[0])
    und = sorted(n for n in g_frozen if _is_und_weight(n))
    gen = sorted(n for n in g_frozen if not _is_und_weight(n))
    assert len(und) > 20 and any("moe_gen" in n for n in gen)
    nonzero_und = [n for n in und if np.any(g_frozen[n] != 0)]
    assert not nonzero_und, f"und weights with a gradient under freeze_und: {nonzero_und}"
    assert all(np.abs(g_free[n]).max() > 0 for n in und if "q_layernorm" not in n and "k_layernorm" not in n)
    zero_gen = [n for n in gen if not np.any(g_frozen[n] != 0)]
    assert not zero_gen, f"gen weights without a gradient under freeze_und: {zero_gen}"
    hf = convert.mm_grads_to_hf("bagel", config, g_frozen)
    for key in ref:
        if not key.startswith("grad."):
            continue
        name = key[len("grad."):]
        if name.startswith("llm2vae."):
            np.testing.assert_allclose(hf[name], ref[key], atol=TOL_GRAD[0], rtol=TOL_GRAD[1], err_msg=name)
        elif "moe_gen" in name or name.split(".")[0] in ("vae2llm", "time_embedder"):
            assert np.abs(hf[name]).max() > 0, name
        else:
            assert not np.any(hf[name] != 0), name
    for name in ("text_decoder.output_layer.weight", "llm2vae.weight", "llm2vae.bias"):
        np.testing.assert_allclose(g_frozen[name], g_free[name], atol=1e-7, rtol=1e-6, err_msg=name)


def test_freeze_und_and_interpolate_pos_config_forms():
    from ms_mm.models.bagel.config import config_from_mindspeed, mindspeed_model_json
    from ms_mm.models.bagel.family import apply_flags

    tiny = BagelConfig.preset("tiny")
    d = tiny.to_dict()
    d["llm"]["freeze_und"], d["interpolate_pos"] = True, True
    c = BagelConfig.from_dict(d)
    assert c.llm.freeze_und is True and c.interpolate_pos is True
    mj = mindspeed_model_json(c)
    assert mj["mllm"]["freeze_und"] is True and mj["interpolate_pos"] is True
    assert config_from_mindspeed(mj).to_dict() == c.to_dict()
    assert apply_flags(BagelConfig.preset("tiny"), {"freeze_und": True}).llm.freeze_und is True
    for path, value, match in ((("llm", "freeze_und"), "yes", r"llm\.freeze_und='yes': expected true or false"),
                               (("interpolate_pos",), 1, r"bagel\.interpolate_pos=1: expected true or false"),
                               (("llm", "vocab_size"), 0, r"llm\.vocab_size: must be a positive int, got 0"),
                               (("vae", "num_res_blocks"), -1, r"vae\.num_res_blocks: must be a non-negative int"),
                               (("max_latent_size",), True, r"bagel\.max_latent_size: must be a positive int, got True")):
        d = tiny.to_dict()
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        with pytest.raises(ValueError, match=match):
            BagelConfig.from_dict(d)


def test_training_latent_is_a_posterior_sample_as_upstream(fixture_arrays):
    """Upstream's training encodes with DiagonalGaussian(sample=True): z = mean + exp(logvar / 2) * eps,
    latent = scale * (z - shift) (modeling/autoencoder.py). Checked on the reference encoder moments; with
    eps = 0, or vae_sample_posterior = False, it is the reference posterior-mean latent, and the train
    Cell's loss follows the switch."""
    import dataclasses

    import mindspore as ms

    from ms_mm.models.bagel.modeling import BagelForTraining
    from ms_mm.training.weights import load_state_dict

    inputs, ref = fixture_arrays
    config, state = convert.load_hf_as_mm(str(FIXTURE), "bagel")
    z = config.vae.z_channels
    moments = ref["vae_encoder_moments"].astype(np.float64)
    eps = np.random.default_rng(7).standard_normal(ref["vae_latent"].shape).astype(np.float32)
    want = config.vae.scale_factor * (moments[:, :z] + np.exp(0.5 * moments[:, z:]) * eps - config.vae.shift_factor)
    net = BagelForTraining(config)
    load_state_dict(net, state)
    images = ms.Tensor(inputs["padded_images"])
    atol, rtol = TOL_VAE
    got = ms.jit(net.vae.sample)(images, ms.Tensor(eps)).asnumpy()
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
    assert np.abs(got - ref["vae_latent"]).max() > 10 * atol      # a sample, not the mean
    zero = ms.jit(net.vae.sample)(images, ms.Tensor(np.zeros_like(eps))).asnumpy()
    np.testing.assert_allclose(zero, ref["vae_latent"], atol=atol, rtol=rtol)

    # the train Cell: sampling on by default, the mean with the switch off (or zero noise)
    from ms_mm.models.bagel.processing import TRAIN_INPUT_NAMES

    model_inputs = build_model_inputs(inputs, config)
    feed = dict(model_inputs, padded_images=inputs["padded_images"])

    def loss(cfg, noise):
        cell = BagelForTraining(cfg)
        load_state_dict(cell, state)
        args = [ms.Tensor(noise if k == "posterior_noise" else feed[k]) for k in TRAIN_INPUT_NAMES]
        return float(ms.jit(cell.construct)(*args)[0].asnumpy())

    mean_cfg = dataclasses.replace(config, vae_sample_posterior=False)
    assert config.vae_sample_posterior is True
    with_noise, without = loss(config, eps), loss(config, np.zeros_like(eps))
    assert abs(without - float(ref["loss"])) <= TOL_LOSS[0]
    assert abs(loss(mean_cfg, eps) - float(ref["loss"])) <= TOL_LOSS[0]
    assert abs(with_noise - without) > 1e-4

"""Lumina-mGPT 2.0 decoder: fp32 parity with the upstream reference fixture
../shared/fixtures/lumina_mgpt2/forward (official ChameleonXLLMXForConditionalGeneration, train mode,
dropout 0), weights loaded through the converter (adapters/lumina_mgpt2.py), graph mode (ms.jit),
gradients mapped back to checkpoint names; the token layout against the fixture's sequences.json;
bit-exact checkpoint round trips; config checks; the switches the fixture leaves off.

Tolerances: the README suggests logits atol = rtol = 1e-4, losses 1e-5, gradients atol 1e-5 + rtol 1e-3.
Observed here: logits 2.2e-6, c_loss 0, z_loss 3.8e-6 (of 41.5: one ulp), gradients <= 7e-8, so
logits are held to atol 1e-5 / rtol 1e-5 and gradients to atol 1e-6 + rtol 1e-4.
"""
import json
from pathlib import Path

import numpy as np
import pytest

import convert
from convert import hf_to_mm, load_hf_as_mm, mm_to_hf
from ms_mm.models.lumina_mgpt2 import (
    LuminaMGPT2Config, build_model_inputs, conversation_sequence, config_from_hf, image_token_ids,
    parse_image_tokens, t2i_sequence,
)
from ms_mm.models.lumina_mgpt2.parity import run_parity
from ms_mm.training.mm_checkpoint import read_safetensors


@pytest.fixture(scope="module")
def case(fixture_root):
    d = fixture_root / "lumina_mgpt2" / "forward"
    return d, dict(np.load(d / "inputs.npz")), dict(np.load(d / "outputs.npz"))


def _close(got, ref, atol, rtol, what):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype, f"{what}: {got.shape}/{got.dtype} vs {ref.shape}/{ref.dtype}"
    err = np.abs(got.astype(np.float64) - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} outside atol={atol} rtol={rtol}, max |diff| {err.max():.3g}"


def test_forward_backward_parity(case):
    d, inputs, ref = case
    grad_names = sorted({k.split(".", 1)[1] for k in ref if k.startswith("grad")})
    out = run_parity(d / "hf", inputs, grad_names)
    assert set(out) == set(ref)
    _close(out["logits"], ref["logits"], 1e-5, 1e-5, "logits")
    for key in ("c_loss", "z_loss", "loss", "z_loss_weight"):
        _close(out[key], ref[key], 1e-5, 0, key)
    checked = 0
    for key in ref:
        if key.startswith("grad"):
            _close(out[key], ref[key], 1e-6, 1e-4, key)
            checked += 1
    assert checked == 8
    with pytest.raises(ValueError, match="^inputs: "):
        run_parity(d / "hf", {"input_ids": inputs["input_ids"]}, [])
    with pytest.raises(ValueError, match="^inputs: "):
        run_parity(d / "hf", {**inputs, "pixel_values": inputs["input_ids"]}, [])
    with pytest.raises(ValueError, match="^grad: "):
        run_parity(d / "hf", inputs, ["model.layers.0.self_attn.qkv.weight"])


def test_token_layout_matches_the_fixture_sequences(case, fixture_root):
    d, inputs, _ = case
    seqs = json.loads((d / "sequences.json").read_text())
    config = config_from_hf(json.loads((d / "hf" / "config.json").read_text()))
    tok = config.tokens
    codes = inputs["image_codes"]
    # the codes are the MoVQGAN fixture's encoding of the same image
    mq = np.load(fixture_root / "lumina_mgpt2" / "movqgan" / "outputs.npz")
    np.testing.assert_array_equal(codes, mq["codes_hw"])
    assert tok.code_offset == seqs["image_token_offset"]
    seq1, sep = seqs["seq1"], tok.separator_id
    start = seq1.index(tok.image_start_id)
    prompt = seq1[1:start - 1]
    ids, labels = t2i_sequence(prompt, codes, tok, config.bos_token_id)
    assert (ids, labels) == (seqs["seq1"], seqs["labels1"])
    img = image_token_ids(codes, tok)
    assert img[1:3] == [tok.grid_base_id + seqs["image_hw"][0] // 32, tok.grid_base_id + seqs["image_hw"][1] // 32]
    back, h_grids, w_grids = parse_image_tokens(seq1[start:-1], tok)
    np.testing.assert_array_equal(back, codes)
    assert (h_grids, w_grids) == (seqs["h_grids"], seqs["w_grids"])
    seq2 = seqs["seq2"]
    q_end = seq2.index(sep)
    assert conversation_sequence([seq2[1:q_end], seq2[q_end + 1:-1]], tok, config.bos_token_id) == \
        (seq2, seqs["labels2"])
    feed = build_model_inputs({"input_ids": [seqs["seq1"], seq2], "labels": [seqs["labels1"], seqs["labels2"]]},
                              config)
    np.testing.assert_array_equal(feed["input_ids"], inputs["input_ids"])
    np.testing.assert_array_equal(feed["labels"], inputs["labels"])
    assert feed["position_ids"].shape == inputs["input_ids"].shape and (feed["position_ids"][1] == np.arange(55)).all()
    with pytest.raises(ValueError, match="whole number"):
        image_token_ids(codes[:3], tok)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_checkpoint_round_trip_is_bit_exact(case, tmp_path, tp, pp):
    d, _, _ = case
    hf = d / "hf"
    mm = hf_to_mm(hf, tmp_path / "mm", "lumina_mgpt2", tp, {"llm": [1, 1]} if pp == 2 else None).parent
    back = mm_to_hf(mm, hf, tmp_path / "back", "LuminaConverter", tp, {"llm": [1, 1]} if pp == 2 else None)
    ref, got = read_safetensors(hf / "model.safetensors"), read_safetensors(back / "model.safetensors")
    assert sorted(got) == sorted(ref)
    assert all(got[k].dtype == ref[k].dtype and got[k].tobytes() == ref[k].tobytes() for k in ref)
    assert json.loads((back / "config.json").read_text()) == json.loads((hf / "config.json").read_text())


def test_config_presets_and_validation(case):
    d, _, _ = case
    config = config_from_hf(json.loads((d / "hf" / "config.json").read_text()))
    assert config == LuminaMGPT2Config.preset("tiny")
    assert LuminaMGPT2Config.from_dict(config.to_dict()) == config
    big = LuminaMGPT2Config.preset("7B")
    assert (big.hidden_size, big.num_hidden_layers, big.head_dim, big.model_parallel_size) == (4096, 32, 128, 1)
    assert big.tokens.code_offset + big.tokens.codebook_size - 1 == 171383  # inference_solver's image token range
    base = config.to_dict()
    for field, value, why in [("num_attention_heads", 5, "hidden_size"), ("num_key_value_heads", 3, "num_attention_heads"),
                              ("model_parallel_size", 4, "num_key_value_heads"), ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "linear"),
                              ("attention_dropout", 0.1, "only 0.0"), ("dropout", 1.0, r"\[0, 1\)"),
                              ("z_loss_weight", -1.0, ">= 0"), ("pad_token_id", 999, "outside"),
                              ("vocab_size", 300, "image codes reach id 319, beyond vocab_size=300")]:
        named = "tokens.code_offset" if field == "vocab_size" else field
        with pytest.raises(ValueError, match=rf"LuminaMGPT2Config\.{named}: .*{why}"):
            LuminaMGPT2Config.from_dict({**base, field: value})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**json.loads((d / "hf" / "config.json").read_text()), "model_type": "llama"})
    assert convert.get_spec("LuminaConverter").family == "lumina_mgpt2"


def test_switches_the_fixture_leaves_off(case):
    """mask_image_logits (IMGIMG ids forced to the fp32 minimum, no gradient into their lm_head rows),
    the padding row (never trained), swin_norm (norms after the sublayers) and dropout (training only)."""
    import mindspore as ms

    from ms_mm.models.lumina_mgpt2.modeling import LuminaMGPT2ForCausalLM
    from ms_mm.training.weights import load_state_dict

    d, inputs, _ = case
    hf_cfg = json.loads((d / "hf" / "config.json").read_text())
    masked = [3, 4, 5]
    hf_cfg["vocabulary_map"] = {**hf_cfg["vocabulary_map"], **{f"IMGIMG{c}Z": i for c, i in zip("ABC", masked)}}
    config = config_from_hf({**hf_cfg, "mask_image_logits": True})
    assert config.masked_image_token_ids == tuple(masked)
    _, state = load_hf_as_mm(d / "hf", "lumina_mgpt2")
    ids = inputs["input_ids"].copy()
    ids[1, 20:] = config.pad_token_id
    feed = build_model_inputs({"input_ids": ids, "labels": inputs["labels"]}, config)
    args = [ms.Tensor(feed[k]) for k in ("input_ids", "labels", "position_ids")]
    net = load_state_dict(LuminaMGPT2ForCausalLM(config), state)
    weights = net.trainable_params()
    (loss, logits, ce, z), grads = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))(*args)
    g = {p.name: x.asnumpy() for p, x in zip(weights, grads)}
    logits = logits.asnumpy()
    assert (logits[..., masked] == np.finfo(np.float32).min).all() and np.isfinite(loss.asnumpy())
    assert not g["text_decoder.output_layer.weight"][masked].any()
    emb = g["text_decoder.embedding.word_embeddings.weight"]
    assert not emb[config.pad_token_id].any() and emb[0].any()

    swin = LuminaMGPT2Config.from_dict({**config.to_dict(), "swin_norm": True, "dropout": 0.5})
    net = load_state_dict(LuminaMGPT2ForCausalLM(swin), state)
    net.set_train(False)
    out_eval = net(*args)[1].asnumpy()
    assert np.isfinite(out_eval).all() and not np.allclose(out_eval, logits)
    np.testing.assert_array_equal(net(*args)[1].asnumpy(), out_eval)  # no dropout in eval
    net.set_train(True)
    assert not np.allclose(net(*args)[1].asnumpy(), out_eval)


SHAPES = Path(__file__).resolve().parent / "fixtures" / "lumina_mgpt2_shapes"
SHAPE_CASES = ["lm_swin_mha_mp4", "lm_gqa8x2_mp2_masked"]


@pytest.mark.parametrize("name", SHAPE_CASES)
def test_decoder_variants_parity(name):
    """Extra cases from the official code (scripts/make_lumina_mgpt2_fixtures.py): swin_norm with one
    q/k-norm row per head and <pad> ids inside the text; 8x2 GQA with mask_image_logits."""
    d = SHAPES / name
    inputs, ref = dict(np.load(d / "inputs.npz")), dict(np.load(d / "outputs.npz"))
    grad_names = sorted({k.split(".", 1)[1] for k in ref if k.startswith("grad")})
    out = run_parity(d / "hf", inputs, grad_names)
    assert set(out) == set(ref)
    _close(out["logits"], ref["logits"], 1e-5, 1e-5, "logits")
    for key in ("c_loss", "z_loss", "loss", "z_loss_weight"):
        _close(out[key], ref[key], 1e-5, 0, key)
    for key in ref:
        if key.startswith("grad"):
            _close(out[key], ref[key], 1e-6, 1e-4, key)
    assert not out["grad.model.embed_tokens.weight"][1].any()  # padding_idx row


def test_padded_vocabulary(tmp_path):
    """vocab 320 padded to 384 rows (make_vocab_size_divisible_by 128, as Megatron): zero rows in the MM
    checkpoint, dropped on the way back (HF round trip bit-exact); their logits are the fp32 minimum with
    no gradient, and loss and real logits equal those of the unpadded model (divisible_by 1)."""
    import mindspore as ms

    from ms_mm.models.lumina_mgpt2.modeling import LuminaMGPT2ForCausalLM
    from ms_mm.training.mm_checkpoint import load_model
    from ms_mm.training.weights import load_state_dict

    d = SHAPES / "lm_gqa8x2_mp2_masked"
    hf = d / "hf"
    config = config_from_hf(json.loads((hf / "config.json").read_text()))
    assert (config.vocab_size, config.padded_vocab_size) == (320, 384)
    mm = hf_to_mm(hf, tmp_path / "mm", "lumina_mgpt2", 2).parent
    state = load_model(str(mm))
    ref = read_safetensors(hf / "model.safetensors")
    for mm_name, hf_name in (("text_decoder.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                             ("text_decoder.output_layer.weight", "lm_head.weight")):
        assert state[mm_name].shape == (384, config.hidden_size)
        np.testing.assert_array_equal(state[mm_name][:320], ref[hf_name])
        assert not state[mm_name][320:].any()
    back = mm_to_hf(mm, hf, tmp_path / "back", "LuminaConverter", 2)
    got = read_safetensors(back / "model.safetensors")
    assert all(got[k].dtype == ref[k].dtype and got[k].tobytes() == ref[k].tobytes() for k in ref)

    inputs = dict(np.load(d / "inputs.npz"))
    feed = build_model_inputs({"input_ids": inputs["input_ids"], "labels": inputs["labels"]}, config)
    args = [ms.Tensor(feed[k]) for k in ("input_ids", "labels", "position_ids")]
    net = load_state_dict(LuminaMGPT2ForCausalLM(config), state)
    weights = net.trainable_params()
    (loss, logits, _, _), grads = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))(*args)
    logits = logits.asnumpy()
    assert logits.shape[-1] == 384 and (logits[..., 320:] == np.finfo(np.float32).min).all()
    g = {p.name: x.asnumpy() for p, x in zip(weights, grads)}
    assert not g["text_decoder.output_layer.weight"][320:].any()
    assert not g["text_decoder.embedding.word_embeddings.weight"][320:].any()

    plain = LuminaMGPT2Config.from_dict({**config.to_dict(), "make_vocab_size_divisible_by": 1})
    unpadded = {k: (v[:320] if v.shape[:1] == (384,) else v) for k, v in state.items()}
    loss1, logits1 = (t.asnumpy() for t in load_state_dict(LuminaMGPT2ForCausalLM(plain), unpadded)(*args)[:2])
    assert logits1.shape[-1] == 320
    np.testing.assert_allclose(logits[..., :320], logits1, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(loss.asnumpy(), loss1, atol=1e-6, rtol=1e-6)

"""Qwen2.5-VL config, host-side inputs and model behaviour (no reference outputs needed).

Each test checks a property the implementation must have: presets match the released configs,
inputs are permutations / partitions with the right structure, padding and weight tying do not
change the result, graph mode trains in fp32 and fp16.
"""
import dataclasses

import numpy as np
import pytest

import mindspore as ms

from ms_mm.training.weights import load_state_dict
from ms_mm.models.qwen2_5_vl import (MODEL_INPUT_NAMES, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                                     build_model_inputs, get_rope_index, vision_layout)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name,hidden,layers,heads,kv,vocab,tied", [
    ("3b", 2048, 36, 16, 2, 151936, True), ("7b", 3584, 28, 28, 4, 152064, False),
    ("32b", 5120, 64, 40, 8, 152064, False), ("72b", 8192, 80, 64, 8, 152064, False)])
def test_presets_match_release(name, hidden, layers, heads, kv, vocab, tied):
    c = Qwen2_5_VLConfig.preset(name)
    t, v = c.text, c.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.vocab_size, t.tie_word_embeddings) == (hidden, layers, heads, kv, vocab, tied)
    assert t.mrope_section == [16, 24, 24] and t.rope_theta == 1e6 and t.head_dim == 128
    assert (v.depth, v.hidden_size, v.num_heads, v.window_size, v.fullatt_block_indexes) == \
        (32, 1280, 16, 112, [7, 15, 23, 31])
    assert v.out_hidden_size == hidden
    assert c.image_token_id == 151655 and c.vision_start_token_id == 151652


def test_config_roundtrip_and_errors():
    c = Qwen2_5_VLConfig.preset("tiny")
    assert Qwen2_5_VLConfig.from_dict(c.to_dict()) == c
    bad = c.to_dict()
    bad["text"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ValueError, match=r"text\.mrope_section"):
        Qwen2_5_VLConfig.from_dict(bad)
    bad = c.to_dict()
    bad["text"]["num_key_value_heads"] = 3
    with pytest.raises(ValueError, match=r"text\.num_attention_heads=4 is not a multiple of text\.num_key_value_heads=3"):
        Qwen2_5_VLConfig.from_dict(bad)
    bad = c.to_dict()
    bad["vision"]["patch_sz"] = 14
    with pytest.raises(ValueError, match=r"vision\.patch_sz"):
        Qwen2_5_VLConfig.from_dict(bad)
    bad = c.to_dict()
    bad["vision"]["fullatt_block_indexes"] = [5]
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        Qwen2_5_VLConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown Qwen2.5-VL preset"):
        Qwen2_5_VLConfig.preset("13b")


# ------------------------------------------------------------------------------------------ inputs
TINY = Qwen2_5_VLConfig.preset("tiny")


def _sample(text_before, grid, text_after, cfg=TINY):
    n_tokens = int(np.prod(grid)) // cfg.vision.merge_unit
    return ([5] * text_before + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_tokens
            + [cfg.vision_end_token_id] + [7] * text_after)


def test_rope_index_image_grid_positions():
    ids = np.array([_sample(3, (1, 4, 6), 2)])
    pos, delta = get_rope_index(ids, None, np.array([[1, 4, 6]]), TINY)
    start = 4  # 3 text tokens + vision_start
    img = pos[:, 0, start:start + 6]  # 2 x 3 merged grid
    np.testing.assert_array_equal(img[0], [4] * 6)                      # t = 0 for images
    np.testing.assert_array_equal(img[1], [4, 4, 4, 5, 5, 5])             # h
    np.testing.assert_array_equal(img[2], [4, 5, 6, 4, 5, 6])             # w
    np.testing.assert_array_equal(pos[:, 0, start + 6], [7, 7, 7])        # text resumes at max + 1
    assert delta[0, 0] == pos.max() + 1 - ids.shape[1]


def test_rope_index_left_padding_matches_unpadded():
    row = _sample(2, (1, 2, 4), 3)
    pad = 4
    ids = np.array([[0] * pad + row, row + [9] * pad])
    mask = np.array([[0] * pad + [1] * len(row), [1] * len(row) + [0] * pad])
    pos, delta = get_rope_index(ids, mask, np.array([[1, 2, 4], [1, 2, 4]]), TINY)
    single, _ = get_rope_index(np.array([row]), None, np.array([[1, 2, 4]]), TINY)
    np.testing.assert_array_equal(pos[:, 0, pad:], single[:, 0])
    np.testing.assert_array_equal(pos[:, 1, :len(row)], single[:, 0])
    assert (pos[:, 0, :pad] == 1).all() and (pos[:, 1, len(row):] == 1).all()
    assert delta[0, 0] == delta[1, 0]


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 10, 14), (2, 6, 4)], [(1, 8, 8)]])
def test_vision_layout_windows(grids):
    cfg = TINY  # window = 56 px = 2 merged units
    win, m, unit = 2, 2, 4
    lay = vision_layout(np.array(grids), cfg)
    n = sum(int(np.prod(g)) for g in grids)
    wi = lay["window_index"]
    assert sorted(wi.tolist()) == list(range(n))                            # a permutation of patches
    merged = wi.reshape(-1, unit)[:, 0] // unit
    np.testing.assert_array_equal(merged[lay["reverse_index"]], np.arange(n // unit))
    # rebuild every patch's (image, frame, h, w) independently, in raster-merge order
    meta = []
    for i, (t, h, w) in enumerate(grids):
        for f in range(t):
            for bh in range(h // m):
                for bw in range(w // m):
                    for dh in range(m):
                        for dw in range(m):
                            meta.append((i, f, bh * m + dh, bw * m + dw))
    meta = np.array(meta)[wi]
    np.testing.assert_array_equal(lay["pos_ids"], meta[:, 2:])
    # window segments are contiguous and hold exactly the patches of one (image, frame, window cell)
    key = meta[:, 0] * 10 ** 6 + meta[:, 1] * 10 ** 4 + (meta[:, 2] // (m * win)) * 100 + meta[:, 3] // (m * win)
    seg = lay["window_seg"]
    assert (np.diff(seg) >= 0).all()
    for s in np.unique(seg):
        assert len(np.unique(key[seg == s])) == 1
    assert len(np.unique(seg)) == len(np.unique(key))
    frame_key = meta[:, 0] * 100 + meta[:, 1]
    for s in np.unique(lay["frame_seg"]):
        assert len(np.unique(frame_key[lay["frame_seg"] == s])) == 1
    assert len(np.unique(lay["frame_seg"])) == sum(g[0] for g in grids)


def test_build_inputs_errors_name_the_problem():
    ids = np.array([_sample(2, (1, 4, 4), 2)])
    good = {"input_ids": ids, "pixel_values": np.zeros((16, 1176), np.float32), "image_grid_thw": np.array([[1, 4, 4]])}
    out = build_model_inputs(good, TINY)
    assert list(out) == list(MODEL_INPUT_NAMES)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(15, 1176\)"):
        build_model_inputs({**good, "pixel_values": np.zeros((15, 1176), np.float32)}, TINY)
    with pytest.raises(ValueError, match=r"has 4 <\|image_pad\|> tokens but image_grid_thw \[1, 4, 8\] needs 8"):
        build_model_inputs({**good, "image_grid_thw": np.array([[1, 4, 8]]),
                            "pixel_values": np.zeros((32, 1176), np.float32)}, TINY)
    with pytest.raises(ValueError, match="labels has shape"):
        build_model_inputs({**good, "labels": ids[:, :-1]}, TINY)
    with pytest.raises(ValueError, match="input_ids outside"):
        build_model_inputs({**good, "input_ids": ids + 1000}, TINY)


# ------------------------------------------------------------------------------------------- model
def _random_state(net, seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    for p in net.get_parameters():
        fan_in = int(np.prod(p.shape[1:])) if len(p.shape) > 1 else 0
        if p.name.endswith("layernorm.weight"):
            state[p.name] = 1 + 0.1 * rng.standard_normal(p.shape)
        elif fan_in:
            state[p.name] = rng.standard_normal(p.shape) / np.sqrt(fan_in if "word_embeddings" not in p.name else 1)
        else:
            state[p.name] = 0.05 * rng.standard_normal(p.shape)
    return {k: v.astype(np.float32) for k, v in state.items()}


def _batch(cfg, rows, grids, seed=1):
    rng = np.random.default_rng(seed)
    width = max(len(r) for r in rows)
    ids = np.array([[0] * (width - len(r)) + r for r in rows])            # left padding
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    labels = np.where((mask == 1) & (ids == 7), ids, -100)
    patches = sum(int(np.prod(g)) for g in grids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "image_grid_thw": np.array(grids),
            "pixel_values": rng.standard_normal((patches, cfg.vision.patch_dim)).astype(np.float32)}


def _run(net, batch, cfg, grad=False):
    args = [ms.Tensor(v) for v in build_model_inputs(batch, cfg).values()]
    if not grad:
        loss, logits = net(*args)
        return loss.asnumpy(), logits.asnumpy()
    weights = net.trainable_params()
    (loss, logits), grads = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))(*args)
    return loss.asnumpy(), logits.asnumpy(), {p.name: g.asnumpy() for p, g in zip(weights, grads)}


@pytest.fixture(scope="module")
def graph_mode():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)


def test_padding_does_not_change_real_tokens(graph_mode):
    cfg = TINY
    net = load_state_dict(Qwen2_5_VLForConditionalGeneration(cfg), _random_state(
        Qwen2_5_VLForConditionalGeneration(cfg)))
    short, long_ = _sample(2, (1, 4, 4), 3), _sample(5, (1, 4, 6), 6)
    both = _batch(cfg, [short, long_], [(1, 4, 4), (1, 4, 6)])
    _, logits = _run(net, both, cfg)
    alone = _batch(cfg, [short], [(1, 4, 4)])
    alone["pixel_values"] = both["pixel_values"][:16]
    loss1, logits1 = _run(net, alone, cfg)
    pad = len(long_) - len(short)
    np.testing.assert_allclose(logits[0, pad:], logits1[0], atol=1e-5, rtol=1e-5)
    assert np.isfinite(loss1)


def test_tied_embeddings_share_one_matrix(graph_mode):
    tied = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, tie_word_embeddings=True))
    net_tied = Qwen2_5_VLForConditionalGeneration(tied)
    names = [p.name for p in net_tied.get_parameters()]
    assert "text_decoder.output_layer.weight" not in names
    state = _random_state(net_tied)
    load_state_dict(net_tied, state)
    untied = load_state_dict(Qwen2_5_VLForConditionalGeneration(TINY), {
        **state, "text_decoder.output_layer.weight": state["text_decoder.embedding.word_embeddings.weight"]})
    batch = _batch(TINY, [_sample(3, (1, 4, 4), 4)], [(1, 4, 4)])
    lt, logit_t, gt = _run(net_tied, batch, tied, grad=True)
    lu, logit_u, gu = _run(untied, batch, TINY, grad=True)
    np.testing.assert_allclose(logit_t, logit_u, atol=1e-5, rtol=1e-5)
    # the tied matrix collects both the input-embedding and the output-layer gradient
    emb = "text_decoder.embedding.word_embeddings.weight"
    np.testing.assert_allclose(gt[emb], gu[emb] + gu["text_decoder.output_layer.weight"], atol=1e-6, rtol=1e-4)


def test_load_state_dict_errors():
    net = Qwen2_5_VLForConditionalGeneration(TINY)
    state = _random_state(net)
    with pytest.raises(ValueError, match="missing 1 tensor.*text_decoder.decoder.final_layernorm.weight"):
        load_state_dict(net, {k: v for k, v in state.items() if k != "text_decoder.decoder.final_layernorm.weight"})
    with pytest.raises(ValueError, match=r"shape mismatch: text_decoder.output_layer.weight: given \[383, 64\]"):
        load_state_dict(net, {**state, "text_decoder.output_layer.weight": np.zeros((383, 64), np.float32)})


def test_fp16_graph_training_step_tracks_fp32(graph_mode):
    batch = _batch(TINY, [_sample(3, (1, 4, 6), 5)], [(1, 4, 6)])
    net32 = Qwen2_5_VLForConditionalGeneration(TINY)
    state = _random_state(net32)
    load_state_dict(net32, state)
    net16 = load_state_dict(Qwen2_5_VLForConditionalGeneration(TINY, compute_dtype=ms.float16), state)
    l32, logits32, g32 = _run(net32, batch, TINY, grad=True)
    l16, logits16, g16 = _run(net16, batch, TINY, grad=True)
    assert logits16.dtype == np.float32 and np.isfinite(l16)
    assert abs(float(l16) - float(l32)) < 1e-2 * abs(float(l32))
    for name in ("image_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.weight",
                 "text_decoder.output_layer.weight"):
        a, b = g16[name], g32[name]
        assert np.all(np.isfinite(a))
        assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(b)


def test_text_only_batch_leaves_vision_untouched(graph_mode):
    net = Qwen2_5_VLForConditionalGeneration(TINY)
    load_state_dict(net, _random_state(net))
    batch = {"input_ids": np.array([[5, 6, 7, 7, 8, 7]]), "labels": np.array([[-100, -100, 7, 7, -100, 7]])}
    loss, logits, grads = _run(net, batch, TINY, grad=True)
    assert np.isfinite(loss) and logits.shape == (1, 6, TINY.text.vocab_size)
    assert not np.any(grads["image_encoder.projector.encoder.linear_fc2.weight"])
    assert np.any(grads["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"])
    # reference loss computed from the logits in numpy: mean CE of the shifted supervised tokens
    lg, lab = logits[0, :-1], batch["labels"][0, 1:]
    keep = lab != -100
    logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    np.testing.assert_allclose(loss, -logp[keep, lab[keep]].mean(), rtol=1e-5)


# ------------------------------------------------------------------------ Ascend path (DryRun)
_DRYRUN_SCRIPT = '''
import os, sys
import numpy as np
import mindspore as ms
from mindspore.communication import init
ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("Ascend")
init()
ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel", device_num=1, full_batch=True)
from ms_mm import ops as mo
from ms_mm.models.qwen2_5_vl import MODEL_INPUT_NAMES, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, build_model_inputs
cfg = Qwen2_5_VLConfig.preset("tiny")
net = Qwen2_5_VLForConditionalGeneration(cfg, compute_dtype=ms.bfloat16)
attn = net.text_decoder.decoder.layers[0].self_attention
assert mo.kernels() == "ascend" and mo.use_fused() and attn.core_attention.fused  # apply_rotary picks its kernel from use_fused()
assert net.image_encoder.encoder.blocks.layers[0].input_layernorm.fused
batch = dict(np.load(sys.argv[1]))
args = [ms.Tensor(v) for v in build_model_inputs(batch, cfg).values()]
class Loss(ms.nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net
    def construct(self, *inputs):
        return self.net(*inputs)[0]
step = ms.nn.TrainOneStepCell(Loss(net), ms.nn.AdamWeightDecay(net.trainable_params(), 1e-4))
step(*args)
print("COMPILED")
'''


def test_ascend_fused_kernels_compile_fwd_bwd_bf16(tmp_path, fixture_root):
    """FlashAttentionScore / RmsNorm / RotaryPositionEmbedding (+ grads) in bf16 pass MindSpore's
    graph compiler for a simulated Ascend card (DryRun level 0: compile only, nothing computes)."""
    import subprocess
    import sys
    from pathlib import Path

    from ms_mm.parallel.fake_cann import dryrun_env, ensure_fake_cann

    script = tmp_path / "dryrun_qwen.py"
    script.write_text(_DRYRUN_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    env = dryrun_env(ensure_fake_cann(), rank_id=0, rank_size=1, level=0)
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{repo}"
    env["MS_MM_KERNELS"] = "ascend"
    inputs = fixture_root / "qwen2_5_vl" / "forward" / "inputs.npz"
    proc = subprocess.run([sys.executable, str(script), str(inputs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "COMPILED" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]

"""DeepSeek-VL2 variants the shared fixtures leave out, against the official code.

tests/fixtures/deepseek_vl2_shapes/ is written by scripts/make_deepseek_vl2_fixtures.py from the
official deepseek-ai/DeepSeek-VL2 modules (torch, fp32; see that script):
- ``lm_*``: decoder variants (q_lora_rank, group-limited / noaux_tc routing with sigmoid scores,
  renormalised top-k, top-1, MoE every other layer, non-seq aux, left padding, MHA with grouped KV
  heads), loaded through the
  converter and run through the mm-parity hook in graph mode;
- ``tiles.npz``: upstream ``prepare_inputs_embeds`` on a padded multi-image batch (global view at
  head and at tail) and upstream ``select_best_resolution`` on 304 image sizes.
Tolerances as the shared fixtures: activations atol = rtol = 1e-4, losses 1e-5, gradients
atol 1e-5 + rtol 1e-3, routing indices and token layout exact.
"""
from pathlib import Path

import numpy as np
import pytest

from ms_mm.models.deepseek_vl2.parity import parity_outputs
from convert import load_hf_as_mm, mm_grads_to_hf
from ms_mm.models.deepseek_vl2 import DeepseekVL2Config, build_model_inputs, select_best_resolution

HERE = Path(__file__).resolve().parent / "fixtures" / "deepseek_vl2_shapes"
LM_CASES = ("lm_qlora_group_limited", "lm_sigmoid_noaux_tc", "lm_mha_gqa_sigmoid", "lm_top1_layer_freq2")


def _close(got, ref, atol, rtol, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} vs reference {ref.shape}"
    err = np.abs(got - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} outside atol={atol} rtol={rtol}, max |diff| {err.max():.3g}"


@pytest.mark.parametrize("case", LM_CASES)
def test_decoder_variants(case):
    d = HERE / case
    config, state = load_hf_as_mm(d / "hf", "deepseek_vl2")
    inputs = dict(np.load(d / "inputs.npz"))
    ref = dict(np.load(d / "outputs.npz"))
    grad_keys = [k for k in ref if k.startswith("grad.")]
    out, grads = parity_outputs(config, state, inputs, gradients=("grad",) if grad_keys else ())

    _close(out["logits"], ref["logits"], 1e-4, 1e-4, "logits")
    _close(out["loss"], ref["loss"], 1e-5, 0, "CE loss")
    moe_keys = [k for k in ref if k.startswith("moe.")]
    assert moe_keys
    for key in moe_keys:
        if key.endswith("topk_idx"):
            np.testing.assert_array_equal(out[key], ref[key], err_msg=key)
        elif key.endswith("topk_weight"):
            _close(out[key], ref[key], 1e-5, 1e-4, key)
        else:
            _close(out[key], ref[key], 1e-6, 1e-4, key)
    if grad_keys:
        hf_grads = mm_grads_to_hf("deepseek_vl2", config, grads["grad"])
        for key in grad_keys:
            _close(hf_grads[key[len("grad."):]], ref[key], 1e-5, 1e-3, key)


def _tiles_config(global_view_pos):
    return DeepseekVL2Config.from_dict(dict(
        vision_config=dict(image_size=56, patch_size=14, width=8, layers=1, heads=2, mlp_ratio=2.0),
        projector_config=dict(input_dim=8, n_embed=6, depth=2, downsample_ratio=2),
        language_config=dict(vocab_size=40, hidden_size=6, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=1, num_key_value_heads=1, use_mla=False, n_routed_experts=None),
        global_view_pos=global_view_pos, candidate_resolutions=[[56, 56]]))


@pytest.mark.parametrize("pos", ["head", "tail"])
def test_token_layout_matches_upstream(pos):
    ref = dict(np.load(HERE / "tiles.npz"))
    batch = {k: ref[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")}
    feed = build_model_inputs(batch, _tiles_config(pos))
    # real tiles only, in order (each fixture tile holds its global number; padding tiles are 0)
    n = ref["tile_embeds"].shape[0]
    np.testing.assert_array_equal(feed["pixel_values"][:, 0, 0, 0], np.arange(1, n + 1, dtype=np.float32))
    table = np.concatenate([ref["tile_embeds"].reshape(-1, ref["tile_embeds"].shape[-1]),
                            ref["image_newline"][None], ref["view_seperator"][None]])
    text = ref["embed_table"][feed["input_ids"]]
    embeds = np.where(feed["images_seq_mask"][..., None], table[feed["image_token_index"]], text)
    np.testing.assert_array_equal(embeds, ref[f"inputs_embeds_{pos}"])
    # left padding: the last query of each sample sees exactly its unpadded keys
    allowed = feed["attention_bias"][:, 0, -1] == 0
    np.testing.assert_array_equal(allowed, ref["attention_mask"].astype(bool))


def test_best_resolution_matches_upstream():
    ref = dict(np.load(HERE / "tiles.npz"))
    cands = ref["resolution_candidates"].tolist()
    got = [select_best_resolution((int(w), int(h)), cands) for w, h in ref["image_sizes"]]
    np.testing.assert_array_equal(np.asarray(got), ref["best_resolutions"])

"""fp32 parity of the MindSpore Qwen2.5-VL with the HF reference (shared fixture qwen2_5_vl/forward).

The checkpoint is loaded through the project's converter (``convert.load_hf_as_mm``), run in
graph mode, and gradients are mapped back to HF names by ``convert.mm_grads_to_hf``.
Tolerances are tighter than the fixture README's suggestion (observed errors are ~10x below).
"""
import numpy as np
import pytest

import mindspore as ms

from convert.parity import run_parity

GRADS = ("visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight",
         "model.layers.0.self_attn.q_proj.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def case(fixture_root):
    root = fixture_root / "qwen2_5_vl" / "forward"
    inputs = dict(np.load(root / "inputs.npz"))
    reference = dict(np.load(root / "outputs.npz"))
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        outputs = run_parity("qwen2_5_vl", str(root / "hf"), inputs, GRADS)
    finally:
        ms.set_context(mode=mode)
    return outputs, reference


def test_positions_exact(case):
    out, ref = case
    np.testing.assert_array_equal(out["position_ids"], ref["position_ids"])
    np.testing.assert_array_equal(out["rope_deltas"], ref["rope_deltas"])


def test_image_embeds(case):
    out, ref = case
    np.testing.assert_allclose(out["image_embeds"], ref["image_embeds"], atol=1e-5, rtol=1e-5)


def test_logits_and_loss(case):
    out, ref = case
    assert out["logits"].shape == ref["logits"].shape
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=3e-5, rtol=3e-5)
    np.testing.assert_allclose(out["loss"], ref["loss"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", GRADS)
def test_gradients(case, name):
    out, ref = case
    got, want = out[f"grad.{name}"], ref[f"grad.{name}"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)

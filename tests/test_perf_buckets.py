"""Static shapes without waste (issue 9, point 1): shape buckets, padding that changes no loss or
gradient, and length grouping that keeps resume exact. Correctness only; no timings."""
import numpy as np
import pytest

import mindspore as ms

from ms_mm.data.loader import Buckets, MllmDataLoader, buckets_from_config, collate


@pytest.fixture(scope="module")
def graph_mode():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)


# ------------------------------------------------------------------------------------------ buckets
def test_bucket_ladder_and_edges():
    ladder = Buckets(multiple=64, maximum=1000)
    assert [ladder.size(n) for n in (1, 64, 65, 129, 193, 257, 385, 513, 769, 1000)] == \
        [64, 64, 128, 192, 256, 384, 512, 768, 1000, 1000]
    # at most 50 % padding between consecutive rungs below the cap
    sizes = sorted({ladder.size(n) for n in range(1, 1001)})
    assert sizes == [64, 128, 192, 256, 384, 512, 768, 1000]
    assert all(b / a <= 1.5 for a, b in zip(sizes[1:], sizes[2:]))
    with pytest.raises(ValueError, match="1001"):
        ladder.size(1001)
    edges = buckets_from_config([256, 128], maximum=512)
    assert [edges.size(n) for n in (3, 128, 129, 300)] == [128, 128, 256, 512]
    with pytest.raises(ValueError, match="list of ints"):
        buckets_from_config("big", None)


# ------------------------------------------------------------------ padding changes nothing (Qwen)
def _qwen_samples(cfg, rng):
    def sample(before, grid, after):
        n = int(np.prod(grid)) // cfg.vision.merge_unit
        ids = np.array([5] * before + [cfg.vision_start_token_id] + [cfg.image_token_id] * n
                       + [cfg.vision_end_token_id] + list(rng.integers(10, 100, after)), np.int64)
        labels = np.where(np.arange(len(ids)) > before + n + 1, ids, -100)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
                "pixel_values": rng.standard_normal((int(np.prod(grid)), cfg.vision.patch_dim)).astype(np.float32),
                "image_grid_thw": np.array([grid], np.int64)}
    return [sample(3, (1, 4, 4), 9), sample(2, (1, 4, 6), 20)]


def _loss_and_grads(net, inputs, names):
    args = [ms.Tensor(inputs[k]) for k in names]
    weights = net.trainable_params()
    (loss, *_), grads = ms.jit(ms.value_and_grad(net, None, weights, has_aux=True))(*args)
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(weights, grads)}


def test_qwen_same_samples_in_two_buckets_give_the_same_loss_and_gradients(graph_mode):
    from ms_mm.models.qwen2_5_vl import MODEL_INPUT_NAMES, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from ms_mm.models.qwen2_5_vl.inputs import build_model_inputs

    cfg = Qwen2_5_VLConfig.preset("tiny")
    ms.set_seed(0)
    net = Qwen2_5_VLForConditionalGeneration(cfg)
    samples = _qwen_samples(cfg, np.random.default_rng(0))
    pad = 490 if cfg.pad_token_id is None else cfg.pad_token_id
    results, shapes = [], []
    for seq_edges, patch_edges in (([48], [48]), ([96], [128])):
        batch = collate(samples, pad, Buckets(seq_edges))
        inputs = build_model_inputs(batch, cfg, Buckets(patch_edges))
        real_patches, padded_patches = inputs.pop("_padding")["patches"]
        assert (real_patches, padded_patches) == (40, patch_edges[0])
        shapes.append((inputs["input_ids"].shape, inputs["pixel_values"].shape))
        results.append(_loss_and_grads(net, inputs, MODEL_INPUT_NAMES))
    assert shapes == [((2, 48), (48, cfg.vision.patch_dim)), ((2, 96), (128, cfg.vision.patch_dim))]
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert np.isfinite(loss_a) and loss_a > 0
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    assert sum(np.abs(g).sum() > 0 for g in grads_a.values()) > len(grads_a) // 2   # vision gets gradients too
    for name, g in grads_a.items():
        np.testing.assert_allclose(grads_b[name], g, rtol=1e-3, atol=1e-5, err_msg=name)


# ------------------------------------------------------------- padding changes nothing (DeepSeek)
def test_deepseek_same_samples_in_two_buckets_give_the_same_loss_and_gradients(graph_mode):
    """Tiles and sequence padded to two buckets. The MoE balance loss is switched off here: upstream
    averages it over every position, padding included, so only the cross-entropy (and its
    gradients) is padding-free by construction, in upstream's code as in ours."""
    import dataclasses

    from ms_mm.models.deepseek_vl2.config import DeepseekVL2Config
    from ms_mm.models.deepseek_vl2.inputs import MODEL_INPUT_NAMES, build_model_inputs, num_image_tokens
    from ms_mm.models.deepseek_vl2.modeling import DeepseekVL2ForCausalLM
    from ms_mm.models.deepseek_vl2.processing import collate_deepseek_vl2

    cfg = DeepseekVL2Config.preset("tiny")
    cfg = dataclasses.replace(cfg, language_config=dataclasses.replace(cfg.language_config, aux_loss_alpha=0.0))
    ms.set_seed(0)
    net = DeepseekVL2ForCausalLM(cfg)
    rng = np.random.default_rng(1)
    tile = cfg.vision_config.image_size
    samples = []
    for (w, h), text in (((1, 1), 6), ((2, 1), 15)):
        n_img = num_image_tokens(w, h, cfg)
        ids = np.concatenate([[1, 2], np.full(n_img, 3), rng.integers(10, 100, text)]).astype(np.int64)
        seq_mask = np.zeros(len(ids), bool)
        seq_mask[2:2 + n_img] = True
        samples.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                        "labels": np.where(np.arange(len(ids)) >= 2 + n_img, ids, -100), "images_seq_mask": seq_mask,
                        "images": rng.uniform(-1, 1, (1 + w * h, 3, tile, tile)).astype(np.float32),
                        "images_spatial_crop": np.array([[w, h]], np.int64)})
    longest = max(len(s["input_ids"]) for s in samples)
    results = []
    for extra, tiles in ((0, 5), (24, 8)):
        batch = collate_deepseek_vl2(samples, 0, Buckets([longest + extra]))
        inputs = build_model_inputs(batch, cfg, Buckets([tiles]))
        assert inputs.pop("_padding")["tiles"] == (5, tiles)
        assert inputs["pixel_values"].shape[0] == tiles and inputs["input_ids"].shape[1] == longest + extra
        results.append(_loss_and_grads(net, inputs, MODEL_INPUT_NAMES))
    (loss_a, grads_a), (loss_b, grads_b) = results
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    for name, g in grads_a.items():
        np.testing.assert_allclose(grads_b[name], g, rtol=1e-3, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- length grouping
class _Lengths:
    """A dataset of token rows whose lengths vary a lot (record i has length 1 + (37 * i) % 50)."""

    def __len__(self):
        return 96

    def __getitem__(self, i):
        n = 1 + (37 * i) % 50
        ids = np.full(n, i, np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
                "pixel_values": np.zeros((0, 4), np.float32), "image_grid_thw": np.zeros((0, 3), np.int64)}


def _loader(group, **kw):
    return MllmDataLoader(_Lengths(), 4, lambda s: collate(s, -1, Buckets(multiple=8, maximum=64)), seed=3,
                          num_workers=0, group_by_length=group, group_window=6, **kw)


def _ids(batch):
    return sorted(set(batch["input_ids"].reshape(-1).tolist()) - {-1})


def test_grouping_by_length_cuts_padding_and_sees_every_sample_once():
    epoch = {}
    for group in (False, True):
        with _loader(group) as loader:
            batches = [next(loader) for _ in range(len(loader))]
            epoch[group] = loader.padding["tokens"]
        seen = sorted(i for b in batches for i in _ids(b))
        assert seen == list(range(96)), group
    (real_plain, padded_plain), (real_grouped, padded_grouped) = epoch[False], epoch[True]
    assert real_plain == real_grouped
    assert padded_grouped < 0.8 * padded_plain


def test_grouped_loader_resumes_exactly_mid_window():
    with _loader(True) as loader:
        reference = [_ids(next(loader)) for _ in range(40)]       # crosses windows and an epoch
    for stop in (1, 3, 6, 7, 25):
        with _loader(True) as first:
            for _ in range(stop):
                next(first)
            state = first.state_dict()
        with _loader(True) as second:
            second.load_state_dict(state)
            resumed = [_ids(next(second)) for _ in range(40 - stop)]
        assert resumed == reference[stop:], stop


# --------------------------------------------------------------------------------- the log
def test_trainer_logs_each_compiled_graph_and_the_padding(tmp_path):
    """The toy family's batches all have one shape: one graph, compiled once, logged once."""
    import io
    import json

    from ms_mm.training.arguments import parse_args
    from ms_mm.training.trainer import train

    (tmp_path / "model.json").write_text(json.dumps({"model_id": "toy_vlm"}))
    (tmp_path / "data.json").write_text(json.dumps({"num_samples": 32}))
    out = io.StringIO()
    train(parse_args(["--mm-model", str(tmp_path / "model.json"), "--mm-data", str(tmp_path / "data.json"),
                      "--micro-batch-size", "4", "--train-iters", "3", "--log-interval", "1"]), stream=out)
    log = out.getvalue()
    assert log.count("compiled the train-step graph for input shapes") == 1
    assert "input-shape buckets: 1 compiled graph(s); padding:" in log

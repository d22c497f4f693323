"""Per-rank data on the sharded path (issue 10, point 2): each data-parallel rank reads and prepares only
its own samples, its model-parallel peers the same ones, and the ranks' inputs concatenated along their
sample axes are exactly the global batch the compiled graph describes.

* which ranks share a slice: ``ParallelConfig.dp_rank`` against MindSpore's own slicing of the dataset
  strategy's layouts (``_get_tensor_slice_index``);
* the ranks' ``dp_slice`` inputs, concatenated, equal the inputs built from the combined samples (Qwen2.5-VL:
  indices equal, attention segments the same partition, and the model's loss and logits the same;
  DeepSeek-VL2: equal);
* data positions kept per dp rank, and ranks whose shapes differ named before the step runs.
"""
import numpy as np
import pytest

from ms_mm.parallel.config import ParallelConfig
from ms_mm.parallel.context import dataset_strategy


@pytest.mark.parametrize("world,tp,pp", [(8, 2, 2), (8, 1, 1), (16, 2, 4), (8, 4, 1), (12, 3, 2)])
def test_dp_rank_is_the_slice_mindspore_gives_each_rank(world, tp, pp):
    from mindspore.parallel._tensor import _get_tensor_slice_index, _get_tensor_strategy

    pc = ParallelConfig(world_size=world, tp=tp, pp=pp)
    per_stage = world // pp
    for ndim, axis in ((2, 1), (3, 2), (4, 1)):
        layout = dataset_strategy(pc, [(ndim, axis)])[0].to_dict()
        dev, tmap = list(layout["device_matrix"]), list(layout["tensor_map"])
        strategy = _get_tensor_strategy(dev, tmap)
        assert strategy == [pc.dp if i == axis else 1 for i in range(ndim)]
        for r in range(world):
            assert _get_tensor_slice_index(dev, strategy, tmap, r % per_stage) == pc.dp_rank(r), (r, ndim, axis)
    # model-parallel peers (same stage, same dp row) read the same samples; every dp rank is someone's
    assert sorted({pc.dp_rank(r) for r in range(world)}) == list(range(pc.dp))
    assert pc.dp_rank(0) == pc.dp_rank(tp - 1) == 0


# ------------------------------------------------------------------------------------------ Qwen2.5-VL
def _qwen_samples(config, grids, seq, seed):
    """A processor batch: sample i holds one image of grid ``grids[i]`` after a vision-start token."""
    vc = config.vision
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vision_start_token_id, size=(len(grids), seq)).astype(np.int64)
    for i, (t, h, w) in enumerate(grids):
        n = t * h * w // vc.merge_unit
        ids[i, 0], ids[i, 1:1 + n], ids[i, 1 + n] = config.vision_start_token_id, config.image_token_id, \
            config.vision_end_token_id
    labels = np.where(ids == config.image_token_id, -100, ids)
    n_patches = sum(t * h * w for t, h, w in grids)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels,
            "pixel_values": rng.standard_normal((n_patches, vc.patch_dim)).astype(np.float32),
            "image_grid_thw": np.array(grids, np.int64)}


def _concat(slices, names, axes):
    return {n: np.concatenate([s[n] for s in slices], axes.get(n, 0)) for n in names}


def _same_partition(a, b):
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_qwen_rank_slices_concatenate_to_the_global_batch():
    from ms_mm.models.qwen2_5_vl import MODEL_INPUT_NAMES, build_model_inputs
    from ms_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig
    from ms_mm.models.qwen2_5_vl.inputs import SAMPLE_AXES, as_dp_slice

    config = Qwen2_5_VLConfig.preset("tiny")
    # the same shapes on every rank (the sharded step's rule), other images: 2 x 8 and 8 x 2 windows differ
    per_rank = [[(1, 4, 8), (1, 8, 4)], [(1, 8, 4), (1, 4, 8)], [(1, 4, 8), (1, 4, 8)]]
    dp, seq = len(per_rank), 24
    batches = [_qwen_samples(config, grids, seq, seed) for seed, grids in enumerate(per_rank)]
    slices = [as_dp_slice(build_model_inputs(b, config), k, dp) for k, b in enumerate(batches)]
    combined = {"input_ids": np.concatenate([b["input_ids"] for b in batches]),
                "attention_mask": np.concatenate([b["attention_mask"] for b in batches]),
                "labels": np.concatenate([b["labels"] for b in batches]),
                "pixel_values": np.concatenate([b["pixel_values"] for b in batches]),
                "image_grid_thw": np.concatenate([b["image_grid_thw"] for b in batches])}
    want = build_model_inputs(combined, config)
    got = _concat(slices, MODEL_INPUT_NAMES, SAMPLE_AXES)
    for name in MODEL_INPUT_NAMES:
        assert got[name].shape == want[name].shape, name
        if name in ("vision_window_seg", "vision_frame_seg"):   # ids differ, the attention segments must not
            assert _same_partition(got[name], want[name]), name
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert np.unique(got["vision_window_seg"]).size == np.unique(want["vision_window_seg"]).size > dp * 2
    # dp 1: the inputs are already the global batch
    alone = build_model_inputs(batches[0], config)
    assert as_dp_slice(alone, 0, 1) is alone

    # and the model sees the same batch: loss and logits of the concatenated slices are the combined batch's
    import mindspore as ms
    from ms_mm.models.qwen2_5_vl.modeling import Qwen2_5_VLForConditionalGeneration

    ms.set_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    run = lambda inputs: model(*[ms.Tensor(inputs[n]) for n in MODEL_INPUT_NAMES])
    (loss_a, logits_a), (loss_b, logits_b) = run(got), run(want)
    np.testing.assert_allclose(loss_a.asnumpy(), loss_b.asnumpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits_a.asnumpy(), logits_b.asnumpy(), rtol=1e-5, atol=1e-5)
    # the parallel plan's vision attention groups (one per dp rank's patches) change nothing either
    model.image_encoder.encoder.set_groups(dp)
    loss_g, logits_g = run(got)
    np.testing.assert_allclose(loss_g.asnumpy(), loss_b.asnumpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(logits_g.asnumpy(), logits_b.asnumpy(), rtol=1e-5, atol=1e-5)


def test_qwen_rank_slice_keeps_a_padding_image_apart():
    """With patch buckets each rank pads with its own blank image: after the slice its segments and
    merge rows are still its own (no rank's window or frame meets another's)."""
    from ms_mm.data.loader import Buckets
    from ms_mm.models.qwen2_5_vl import build_model_inputs
    from ms_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig
    from ms_mm.models.qwen2_5_vl.inputs import as_dp_slice

    config = Qwen2_5_VLConfig.preset("tiny")
    buckets = Buckets([64])
    slices = [as_dp_slice(build_model_inputs(_qwen_samples(config, [(1, 4, 8)], 16, k), config, buckets), k, 2)
              for k in range(2)]
    for name in ("vision_window_seg", "vision_frame_seg", "vision_window_index", "vision_reverse_index"):
        a, b = (set(s[name].reshape(-1).tolist()) for s in slices)
        assert not a & b, name
    assert sorted(np.concatenate([s["vision_window_index"] for s in slices]).tolist()) == list(range(128))


# ---------------------------------------------------------------------------------------- DeepSeek-VL2
def test_deepseek_rank_slices_concatenate_to_the_global_batch():
    from ms_mm.models.deepseek_vl2 import build_model_inputs
    from ms_mm.models.deepseek_vl2.config import DeepseekVL2Config
    from ms_mm.models.deepseek_vl2.inputs import MODEL_INPUT_NAMES, as_dp_slice, num_image_tokens

    config = DeepseekVL2Config.preset("tiny")
    tile, vocab = config.vision_config.image_size, config.language_config.vocab_size
    seq, dp = 64, 2

    def samples(crops, seed):   # sample i: one image of crops[i] = (w tiles, h tiles)
        rng = np.random.default_rng(seed)
        b = len(crops)
        ids = rng.integers(0, vocab, size=(b, seq)).astype(np.int64)
        mask = np.zeros((b, seq), bool)
        max_tiles = max(1 + w * h for w, h in crops)
        for i, (w, h) in enumerate(crops):
            mask[i, 1:1 + num_image_tokens(w, h, config)] = True
        return {"input_ids": ids, "labels": np.where(mask, -100, ids), "images_seq_mask": mask,
                "images": rng.standard_normal((b, max_tiles, 3, tile, tile)).astype(np.float32),
                "images_spatial_crop": np.array(crops, np.int64).reshape(b, 1, 2)}

    # equal tile counts per rank (3 tiles each), other crops: rank 0 holds 1x2, rank 1 2x1
    batches = [samples([(1, 2)], 0), samples([(2, 1)], 1)]
    slices = [as_dp_slice(build_model_inputs(b, config), k, dp, config) for k, b in enumerate(batches)]
    combined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    want = build_model_inputs(combined, config)
    for name in MODEL_INPUT_NAMES:
        np.testing.assert_array_equal(np.concatenate([s[name] for s in slices]), want[name], err_msg=name)


# ----------------------------------------------------------------------------------- positions, shapes
def _fake_all_gather(per_rank_rows):
    """An all-gather over ranks whose rows come from ``per_rank_rows`` (called once per gather, in order)."""
    calls = iter(per_rank_rows)

    def gather(rows):
        return next(calls)
    return gather


def test_data_positions_are_kept_one_per_dp_rank():
    from ms_mm.training.trainer import _per_dp_rank

    pc = ParallelConfig(world_size=8, tp=2, pp=2)
    gathered = {"per_rank": [{"rank": r, "dp": pc.dp_rank(r)} for r in range(8)]}
    assert _per_dp_rank(gathered, pc) == {"per_rank": [{"rank": 0, "dp": 0}, {"rank": 2, "dp": 1}]}


def test_ranks_with_other_shapes_are_named():
    import json

    from ms_mm.training.trainer import _check_same_shapes

    def rows_of(states):
        blobs = [np.frombuffer(json.dumps(s, sort_keys=True).encode(), np.uint8).astype(np.int64) for s in states]
        n = max(b.size for b in blobs)
        return [np.array([[b.size] for b in blobs], np.int64),
                np.stack([np.pad(b, (0, n - b.size)) for b in blobs])]

    names = ("input_ids", "pixel_values")
    same = [{"shapes": [[1, 64], [64, 1176]]}] * 2
    _check_same_shapes(((1, 64), (64, 1176)), names, 2, _fake_all_gather(rows_of(same)))
    other = same[:1] + [{"shapes": [[1, 64], [128, 1176]]}]
    with pytest.raises(ValueError, match=r"rank 1's micro batches have other shapes than rank 0's \(pixel_values "
                                         r"\[64, 1176\] vs \[128, 1176\]\)"):
        _check_same_shapes(((1, 64), (64, 1176)), names, 2, _fake_all_gather(rows_of(other)))

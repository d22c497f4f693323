"""BAGEL data pipeline: the bagel_example layout, packing to static budgets, exact resume, sharding and
bad input (one clear error naming the file / key, or a counted skip)."""
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ms_mm.data import BadSampleError
from ms_mm.models.bagel import demo
from ms_mm.models.bagel.inputs import MASK_VALUE, build_model_inputs
from ms_mm.models.bagel.processing import (TRAIN_INPUT_NAMES, DataConfigError, build_bagel_dataloader,
                                           read_data_settings)
from ms_mm.models.bagel.tiny import tiny_config
from ms_mm.models.bagel.tokenizer import special_ids


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bagel_demo")
    demo.make_demo_dataset(out, n=24, seed=0)
    return out


@pytest.fixture(scope="module")
def config():
    return tiny_config(special_ids())


def _take(loader, n):
    out = [next(loader) for _ in range(n)]
    return out


def test_demo_layout_and_static_budgets(demo_dir, config):
    assert sorted(p.name for p in (demo_dir / "t2i").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    info = json.loads((demo_dir / "editing" / "parquet_info" / "seedxedit_multi.json").read_text())
    assert len(info) == 2 and all(v["num_rows"] == 12 for v in info.values())
    cfg = demo.demo_data_config(demo_dir)
    loader = build_bagel_dataloader(cfg, config)
    b = loader.s.budgets
    try:
        batches = _take(loader, 8)
    finally:
        loader.close()
    shapes = {tuple((k, batches[0][k].shape) for k in TRAIN_INPUT_NAMES)}
    for batch in batches:
        shapes.add(tuple((k, batch[k].shape) for k in TRAIN_INPUT_NAMES))
        S = b.max_num_tokens
        assert batch["attention_mask"].shape == (1, 1, S, S) and batch["token_budget"] == S
        assert 0 < batch["num_real_tokens"] <= S
        mask = batch["attention_mask"][0, 0]
        real = np.zeros(S, bool)
        real[batch["row_of_position"]] = True
        # padding rows see only themselves; no real row sees a padding row
        pad = np.nonzero(~real)[0]
        assert np.all(mask[np.ix_(pad, pad)][~np.eye(len(pad), dtype=bool)] == MASK_VALUE)
        assert np.all(np.diagonal(mask)[pad] == 0)
        assert np.all(mask[np.ix_(real, ~real)] == MASK_VALUE)
        # loss weights: 1 / number of real loss tokens, 0 on padding
        for kind in ("ce", "mse"):
            n = batch[f"num_{kind}_tokens"]
            w = batch[f"{kind}_weights"]
            assert np.count_nonzero(w) == n and (n == 0 or abs(w.sum() - 1.0) < 1e-5)
    assert len(shapes) == 1, "every batch must have the same (static) shapes"
    # all three kinds of data arrive: CE (understanding) and MSE (generation) tokens, VAE and ViT images
    assert sum(bt["num_ce_tokens"] for bt in batches) > 0 and sum(bt["num_mse_tokens"] for bt in batches) > 0
    assert loader.stats["real_tokens"] / loader.stats["budget_tokens"] > 0.5


def test_padded_forward_equals_unpadded(demo_dir, config):
    """The budget-padded batch gives the same CE / MSE as the same packed sequence without padding."""
    import mindspore as ms

    from ms_mm.models.bagel.modeling import Bagel
    from ms_mm.models.bagel import processing as P

    ms.set_context(mode=ms.GRAPH_MODE)
    loader = build_bagel_dataloader(demo.demo_data_config(demo_dir), config)
    try:
        packed, noise = None, None
        # rebuild one packed batch by hand, both ways
        st = loader.streams
        rng = np.random.default_rng(5)
        packer = P.Packer(loader.s, loader.special, rng)
        for stream in st:
            sample = stream.sample(stream.next())
            packer.add(sample, P.sample_cost(sample, loader.s))
        packed = packer.batch()
    finally:
        loader.close()
    net = Bagel(config)
    padded = P.padded_model_inputs(packed, config, loader.s.budgets, np.random.default_rng(1), 16)
    images = ms.Tensor(padded["padded_images"])
    _, latent_padded = net.vae(images)
    n_img = len(packed["vae_images"])
    args = [ms.Tensor(padded[k]) if k != "padded_images" else latent_padded for k in TRAIN_INPUT_NAMES
            if k != "posterior_noise"]
    out_pad = net(*args)
    # unpadded: the same latents (the VAE on the same padded canvas), the same noise on the real rows
    real = build_model_inputs({**packed, "padded_latent": latent_padded.asnumpy()[:n_img],
                               "noise": padded["noise"][:len(packed["packed_vae_token_indexes"])]}, config)
    out = net(*[ms.Tensor(real[k]) for k in ("text_ids", "vit_pixels", "vit_position_ids", "vit_attention_mask",
                                              "padded_latent", "latent_gather_index", "latent_position_ids",
                                              "timesteps", "noise", "position_ids", "attention_mask", "ce_rows",
                                              "ce_labels", "ce_weights", "mse_rows", "mse_latent_rows",
                                              "mse_weights")])
    for i, name in ((1, "ce"), (2, "mse")):
        a, b = float(out_pad[i].asnumpy()), float(out[i].asnumpy())
        assert a > 0 and abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{name}: padded {a} vs unpadded {b}"


def test_resume_gives_the_same_batches(demo_dir, config):
    cfg = demo.demo_data_config(demo_dir)
    first = build_bagel_dataloader(cfg, config)
    try:
        head = _take(first, 3)
        state = json.loads(json.dumps(first.state_dict()))      # as the checkpoint stores it
        tail = _take(first, 4)
    finally:
        first.close()
    second = build_bagel_dataloader(cfg, config)
    try:
        second.load_state_dict(state)
        again = _take(second, 4)
    finally:
        second.close()
    assert state["buffer"], "the test should cover a non-empty packing buffer"
    for a, b in zip(tail, again):
        for k in TRAIN_INPUT_NAMES:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not all(np.array_equal(head[0][k], tail[0][k]) for k in TRAIN_INPUT_NAMES)


def test_parquet_sharding_across_ranks(demo_dir, config):
    cfg = demo.demo_data_config(demo_dir)
    records = []
    for rank in (0, 1):
        loader = build_bagel_dataloader(cfg, config, rank=rank, world_size=2)
        records.append([set(st.records) for st in loader.streams])
        loader.close()
    for group in range(3):
        assert records[0][group] and not records[0][group] & records[1][group]
    t2i_files = [{r[0] for r in records[rank][0]} for rank in (0, 1)]
    assert len(t2i_files[0]) == 1 and t2i_files[0] != t2i_files[1]   # one parquet file per rank
    bad = copy.deepcopy(cfg)
    bad["dataset_param"]["basic_parameters"]["t2i_pretrain"]["t2i"]["num_files"] = 3
    with pytest.raises(DataConfigError, match=r"t2i_pretrain\.t2i\.num_files = 3 is not a multiple of the card "
                                              r"count 2"):
        build_bagel_dataloader(bad, config, rank=0, world_size=2)


def _copy_demo(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_parquet_columns_and_image_bytes(demo_dir, config, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _copy_demo(demo_dir, tmp_path / "d")
    cfg = demo.demo_data_config(root)
    path = root / "t2i" / "part-00001.parquet"
    pq.write_table(pa.table({"picture": [b"x"], "captions": ["{}"]}), path)
    with pytest.raises(DataConfigError, match=rf"{path}: parquet file lacks column\(s\) \['image'\]"):
        build_bagel_dataloader(cfg, config)
    # undecodable bytes: one error naming file, row group and row; or counted skips
    table = pq.read_table(root / "t2i" / "part-00000.parquet").to_pydict()
    table["image"] = [b"not a png"] * len(table["image"])
    pq.write_table(pa.table(table), path)
    only_t2i = copy.deepcopy(cfg)
    only_t2i["dataset_param"]["basic_parameters"]["available_data"] = ["t2i_pretrain"]
    loader = build_bagel_dataloader(only_t2i, config)
    with pytest.raises(BadSampleError, match=rf"{path}: row group 0, row \d+, column 'image': cannot decode the "
                                             r"image bytes"):
        _take(loader, 6)
    loader.close()
    loader = build_bagel_dataloader(only_t2i, config, skip_bad_samples=True)
    try:
        _take(loader, 4)
        assert loader.skipped > 0
    finally:
        loader.close()


def test_too_long_sample_and_unknown_dataset(demo_dir, config, tmp_path):
    cfg = demo.demo_data_config(demo_dir)
    short = copy.deepcopy(cfg)
    short["dataset_param"]["packed_parameters"]["max_num_tokens_per_sample"] = 20
    loader = build_bagel_dataloader(short, config)
    with pytest.raises(BadSampleError, match=r"more than max_num_tokens_per_sample = 20"):
        next(loader)
    loader.close()
    bad = copy.deepcopy(cfg)
    bad["dataset_param"]["basic_parameters"]["t2i_pretrain"]["dataset_names"] = ["laion"]
    with pytest.raises(DataConfigError, match=r"t2i_pretrain\.dataset_names: unknown dataset 'laion'"):
        read_data_settings(bad)
    bad = copy.deepcopy(cfg)
    bad["dataset_param"]["basic_parameters"]["available_data"] = ["t2i_pretrain", "video_sft"]
    with pytest.raises(DataConfigError, match=r"available_data names 'video_sft' but .*video_sft \(an object\) is "
                                              r"missing"):
        read_data_settings(bad)
    # the upstream form: data/configs/*.yaml + data/dataset_info.py
    bp = cfg["dataset_param"]["basic_parameters"]
    info = {g: {n: bp[g][n] for n in bp[g]["dataset_names"]} for g in bp["available_data"]}
    (tmp_path / "dataset_info.py").write_text("from .t2i_dataset import X\n\nDATASET_INFO = " + repr(info) + "\n")
    yaml_text = "t2i_pretrain:\n  dataset_names:\n  - t2i\n  image_transform_args:\n    image_stride: 16\n" \
                "    max_image_size: 64\n    min_image_size: 64\n  is_mandatory: true\n  weight: 1\n" \
                "vlm_sft:\n  dataset_names:\n  - llava_onevision\n  image_transform_args:\n    image_stride: 14\n" \
                "    max_image_size: 56\n    min_image_size: 56\n"
    (tmp_path / "example.yaml").write_text(yaml_text)
    up = copy.deepcopy(cfg)
    up["dataset_param"]["basic_parameters"] = {"dataset_config_file": str(tmp_path / "example.yaml"),
                                               "dataset_info": str(tmp_path / "dataset_info.py"),
                                               "model_path": bp["model_path"]}
    with pytest.raises(DataConfigError, match=r"example\.yaml: vlm_sft\.dataset_names: unknown dataset "
                                              r"'llava_onevision' \(dataset_info\['vlm_sft'\] has \['llava_ov'\]\)"):
        read_data_settings(up)
    (tmp_path / "example.yaml").write_text(yaml_text.replace("llava_onevision", "llava_ov"))
    settings = read_data_settings(up)
    assert [g.kind for g in settings.groups] == ["t2i_pretrain", "vlm_sft"]
    assert settings.groups[0].infos[0]["data_dir"] == str(demo_dir / "t2i")


def test_interpolated_position_ids_by_hand():
    """Upstream data_utils.py `get_flattened_position_ids_interpolate`, worked out by hand.

    Grid of max_per_side = 4: boundaries = arange(1/4, 1, 1/4) = [0.25, 0.5, 0.75]; a cell at fraction
    f gets bucketize(f, boundaries, right=True) = the number of boundaries <= f.
    * 3 x 5 patches (42 x 70 px, patch 14): rows at 0, 1/3, 2/3 -> buckets 0, 1, 2; columns at 0, .2,
      .4, .6, .8 -> 0, 0, 1, 2, 3; id = row * 4 + col.
    * 2 x 6 patches: rows 0, .5 -> 0, 2 (.5 sits on a boundary, which right=True counts); columns
      0, 1/6, 1/3, 1/2, 2/3, 5/6 -> 0, 0, 1, 2, 2, 3.
    Extrapolation instead puts cell (r, c) at r * 4 + c (a 5-wide row spills into the next grid row).
    """
    from ms_mm.models.bagel.processing import flattened_position_ids

    want_3x5 = [0, 0, 1, 2, 3,
                4, 4, 5, 6, 7,
                8, 8, 9, 10, 11]
    assert flattened_position_ids(42, 70, 14, 4, interpolate=True).tolist() == want_3x5
    want_2x6 = [0, 0, 1, 2, 2, 3,
                8, 8, 9, 10, 10, 11]
    assert flattened_position_ids(28, 84, 14, 4, interpolate=True).tolist() == want_2x6
    assert flattened_position_ids(42, 70, 14, 4).tolist() == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12]
    # a full-grid image maps onto itself (on the released 70 grid too: the fractions k/70 meet the
    # boundaries k/70 in float32 and right=True keeps them in bucket k); 37 rows on 70: the last one, at
    # 36/37 = 0.973, lands in grid row floor(0.973 * 70) = 68
    assert flattened_position_ids(56, 56, 14, 4, interpolate=True).tolist() == list(range(16))
    ids = flattened_position_ids(14 * 37, 14 * 70, 14, 70, interpolate=True)
    assert ids[:70].tolist() == list(range(70)) and ids.max() == 68 * 70 + 69 and len(set(ids.tolist())) == 37 * 70


def test_interpolate_pos_reaches_the_packed_batch(demo_dir, config):
    """interpolate_pos (one flag for model and data, as upstream) switches the ViT and latent ids."""
    from ms_mm.models.bagel import processing as P

    cfg = demo.demo_data_config(demo_dir)
    with pytest.raises(DataConfigError, match=r"basic_parameters\.interpolate_pos False differs from the model's"):
        build_bagel_dataloader(cfg, dataclasses.replace(config, interpolate_pos=True))
    cfg = copy.deepcopy(cfg)
    cfg["dataset_param"]["basic_parameters"].pop("interpolate_pos", None)
    loader = build_bagel_dataloader(cfg, dataclasses.replace(config, interpolate_pos=True))
    try:
        s = loader.s
        assert s.interpolate_pos is True
        packer = P.Packer(s, loader.special, np.random.default_rng(0))
        vit_img, vae_img = np.zeros((3, 42, 70), np.float32), np.zeros((3, 32, 48), np.float32)
        sample = {"sequence_plan": [P._plan("vit_image"), P._plan("text"), P._plan("vae_image", loss=1)],
                  "text_ids_list": [[5, 6]], "images": [vit_img, vae_img]}
        packer.add(sample, P.sample_cost(sample, s))
        batch = packer.batch()
    finally:
        loader.close()
    np.testing.assert_array_equal(batch["packed_vit_position_ids"],
                                  P.flattened_position_ids(42, 70, s.vit_patch_size, s.max_num_patch_per_side, True))
    np.testing.assert_array_equal(batch["packed_latent_position_ids"],
                                  P.flattened_position_ids(32, 48, s.vae_image_downsample, s.max_latent_size, True))
    assert not np.array_equal(batch["packed_vit_position_ids"],
                              P.flattened_position_ids(42, 70, s.vit_patch_size, s.max_num_patch_per_side))


def test_the_shared_prefetcher_keeps_batches_ready(demo_dir, config):
    """The loader runs on `ms_mm.data.prefetch.Prefetcher`: while the step computes, the next `prefetch`
    batches get ready; closing stops the producer, and iterating again restarts it at the same position."""
    import time

    from ms_mm.data.prefetch import Prefetcher

    loader = build_bagel_dataloader(demo.demo_data_config(demo_dir), config)
    try:
        first = next(loader)
        assert isinstance(loader._prefetcher, Prefetcher)
        end = time.monotonic() + 60
        while loader.prefetched < loader.prefetch and time.monotonic() < end:
            time.sleep(0.05)
        assert loader.prefetched == loader.prefetch
        state = loader.state_dict()
        loader.close()
        assert loader.prefetched == 0 and state["batches"] == 1
        second = next(loader)                        # restarted from the position of the last batch handed out
        assert loader.state_dict()["batches"] == 2
    finally:
        loader.close()
    reference = build_bagel_dataloader(demo.demo_data_config(demo_dir), config)
    try:
        a, b = _take(reference, 2)
    finally:
        reference.close()
    for k in TRAIN_INPUT_NAMES:
        np.testing.assert_array_equal(first[k], a[k], err_msg=k)
        np.testing.assert_array_equal(second[k], b[k], err_msg=k)

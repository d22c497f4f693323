"""DeepSeek-VL2 data pipeline: processor exactness against the upstream-processor fixtures, tiling,
bad input, the jsonl dataset through the shared loader (order, sharding, resume, skipping), the
ai2d converter, the bundled tiny tokenizer and the demo data."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ms_mm.data import BadSampleError, build_dataloader
from ms_mm.models.deepseek_vl2.processing import (DeepseekVL2DataProcessor, build_deepseek_vl2_dataset,
                                     collate_deepseek_vl2, select_best_resolution)
from ms_mm.models.deepseek_vl2 import demo as deepseek_vl2_demo, tokenizer as deepseek_vl2_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO / "examples" / "deepseekvl2" / "convert_ai2d_to_dsvl.py"
FIXTURE_KEYS = ("input_ids", "attention_mask", "labels", "images", "images_seq_mask", "images_spatial_crop")


def _fixture_sample(root):
    conv = json.loads((root / "conversation.json").read_text())
    return conv["conversations"], [str(root / p) for p in conv["images"]]


@pytest.fixture(scope="module")
def fixture_processor(fixture_root):
    return DeepseekVL2DataProcessor(fixture_root / "deepseek_vl2" / "forward" / "hf")


@pytest.fixture(scope="module")
def tiny_processor():
    return DeepseekVL2DataProcessor(deepseek_vl2_tokenizer.asset_dir())


# ------------------------------------------------------------- fixture parity
@pytest.mark.parametrize("case", ["forward", "forward_mha"])
def test_processor_reproduces_fixture_exactly(fixture_root, case):
    root = fixture_root / "deepseek_vl2" / case
    ref = np.load(root / "inputs.npz")
    proc = DeepseekVL2DataProcessor(root / "hf")
    messages, images = _fixture_sample(root)
    batch = collate_deepseek_vl2([proc(messages, images)], proc.pad_token_id)
    assert sorted(batch) == sorted(FIXTURE_KEYS) == sorted(ref.files)
    for key in FIXTURE_KEYS:
        assert batch[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(batch[key], ref[key], err_msg=key)


def test_processor_accepts_pil_images_and_plain_role_names(fixture_root, fixture_processor):
    root = fixture_root / "deepseek_vl2" / "forward"
    ref = np.load(root / "inputs.npz")
    messages, images = _fixture_sample(root)
    plain = [{"role": "user" if m["role"] == "<|User|>" else "assistant", "content": m["content"]}
             for m in messages]
    out = fixture_processor(plain, [Image.open(images[0])])
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"][0])
    np.testing.assert_array_equal(out["images"], ref["images"][0])


def test_select_best_resolution_upstream_rule():
    cands = [(70, 70), (70, 140), (140, 70), (140, 140)]
    assert select_best_resolution((130, 60), cands) == (140, 70)     # the fixture image
    assert select_best_resolution((60, 130), cands) == (70, 140)
    assert select_best_resolution((50, 50), cands) == (70, 70)       # whole image fits: least padding
    assert select_best_resolution((300, 290), cands) == (140, 140)
    # equal effective area and waste: the first listed wins
    assert select_best_resolution((10, 10), [(20, 20), (20, 20)]) == (20, 20)


def test_token_layout_and_tiles(tiny_processor):
    p = tiny_processor
    # tile 70, patch 14, downsample 2: 3 x 3 tokens a tile
    assert p.tokens_per_tile_side == 3
    assert p.num_image_tokens(2, 1) == 3 * 4 + 1 + 3 * 7
    img = Image.new("RGB", (60, 130), (10, 200, 30))
    out = p([{"role": "user", "content": "<image>\nWhat color is the shape?"},
             {"role": "assistant", "content": "The shape is green."}], [img])
    assert out["images_spatial_crop"].tolist() == [[1, 2]]            # 60x130 -> 70x140 (140x140 keeps no more)
    assert out["images"].shape == (3, 3, 70, 70) and out["images"].dtype == np.float32
    mask = out["images_seq_mask"]
    assert mask.sum() == p.num_image_tokens(1, 2) == 12 + 1 + 6 * 4
    assert (out["input_ids"][mask] == p.image_token_id).all() and (out["labels"][mask] == -100).all()
    # global view: the image scaled into 70x70 (32 wide), padded left/right with 127 -> (127/255-.5)/.5
    pad = np.float32((np.float32(127) / np.float32(255) - 0.5) / 0.5)
    assert (out["images"][0, :, :, 0] == pad).all()
    green = np.float32((np.float32(200) / np.float32(255) - 0.5) / 0.5)
    assert out["images"][0, 1, 35, 35] == green


def test_more_than_two_images_are_not_cropped(tiny_processor):
    imgs = [Image.new("RGB", (130, 60), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    out = tiny_processor([{"role": "user", "content": "<image><image><image>Same color?"},
                          {"role": "assistant", "content": "No."}], imgs)
    assert out["images_spatial_crop"].tolist() == [[1, 1]] * 3
    assert out["images"].shape[0] == 6


def test_labels_bos_eos_and_text_only(tiny_processor):
    p = tiny_processor
    out = p([{"role": "<|User|>", "content": "Hi"}, {"role": "<|Assistant|>", "content": " It is red. "}])
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    prompt = p.encode("<|User|>: Hi\n\n<|Assistant|>:")
    answer = p.encode("It is red.")
    assert ids == [p.bos_token_id] + prompt + answer + [p.eos_token_id]
    assert labels == [p.bos_token_id] + [-100] * len(prompt) + answer + [p.eos_token_id]
    assert out["images"].shape == (1, 3, 70, 70) and not out["images"].any()
    assert out["images_spatial_crop"].tolist() == [[0, 0]] and not out["images_seq_mask"].any()
    infer = DeepseekVL2DataProcessor(deepseek_vl2_tokenizer.asset_dir(), inference_mode=True)
    assert infer([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "It is red."}])[
        "input_ids"].tolist() == ids[:-1]


def test_max_length_truncates_text_but_never_an_image(tiny_processor):
    proc = DeepseekVL2DataProcessor(deepseek_vl2_tokenizer.asset_dir(), max_length=45)
    img = Image.new("RGB", (60, 60))
    msgs = [{"role": "user", "content": "<image>Describe the image."},
            {"role": "assistant", "content": "A red circle in the top left on a black background."}]
    full = tiny_processor(msgs, [img])
    cut = proc(msgs, [img])
    assert len(full["input_ids"]) > 45 and len(cut["input_ids"]) == 45
    for key in ("input_ids", "labels", "images_seq_mask"):
        np.testing.assert_array_equal(cut[key], full[key][:45])
    with pytest.raises(BadSampleError, match="nothing to supervise"):  # only the prompt would be left
        DeepseekVL2DataProcessor(deepseek_vl2_tokenizer.asset_dir(), max_length=38)(msgs, [img])
    with pytest.raises(BadSampleError, match="would cut an image"):
        DeepseekVL2DataProcessor(deepseek_vl2_tokenizer.asset_dir(), max_length=20)(msgs, [img])


def test_processor_bad_input(tiny_processor, tmp_path):
    p = tiny_processor
    q = [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "It."}]
    with pytest.raises(BadSampleError, match="1 <image> tag.*but 0 image"):
        p(q, [])
    with pytest.raises(BadSampleError, match="images belong on user turns"):
        p([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<image>"}], [Image.new("RGB", (9, 9))])
    with pytest.raises(BadSampleError, match="unknown role 'bot'"):
        p([{"role": "bot", "content": "Hi"}])
    with pytest.raises(BadSampleError, match="image not found: .*nope.png"):
        p(q, [str(tmp_path / "nope.png")])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(BadSampleError, match="cannot read image .*bad.png"):
        p(q, [str(tmp_path / "bad.png")])
    with pytest.raises(BadSampleError, match="nothing to supervise"):
        p([{"role": "user", "content": "Hi"}])
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        DeepseekVL2DataProcessor(tmp_path)


# ------------------------------------------------------------- dataset + loader
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsvl2_demo")
    deepseek_vl2_demo.make_demo_dataset(root, n=12, seed=5)
    return root


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_demo_records_match_the_mllm_demo(demo):
    lines = (demo / deepseek_vl2_demo.DATA_FILE).read_text().splitlines()
    mllm = json.loads((demo / "mllm_format_demo_data.json").read_text())
    assert len(lines) == len(mllm) == 12
    for line, src in zip(lines, mllm):
        rec = json.loads(line)
        assert [m["content"] for m in rec["conversations"]] == [m["content"] for m in src["messages"]]
        assert {m["role"] for m in rec["conversations"]} <= {"<|User|>", "<|Assistant|>"}
        assert [p for m in rec["conversations"] for p in m.get("images", [])] == src["images"]
        for m in rec["conversations"]:
            assert len(m.get("images", [])) == m["content"].count("<image>")


def test_loader_batches_order_resume_and_shards(demo):
    cfg = deepseek_vl2_demo.demo_data_config(demo)
    loader = build_dataloader(cfg, micro_batch_size=2, seed=7, num_workers=2)  # dispatch on dataset_type
    assert len(loader) == 6
    first = _take(loader, 4)
    b = first[0]
    assert b["input_ids"].shape == (2, deepseek_vl2_demo.DEMO_MAX_LENGTH)  # pad_to max_length
    assert b["images"].ndim == 5 and b["images_spatial_crop"].shape[0] == 2
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == loader.dataset.processor.pad_token_id).all()
    state = loader.state_dict()
    rest = _take(loader, 3)  # crosses into epoch 1
    loader.close()

    again = build_dataloader(cfg, micro_batch_size=2, seed=7, num_workers=0)
    _same(_take(again, 4), first)  # same seed, same order, whatever the worker count
    resumed = build_dataloader(cfg, micro_batch_size=2, seed=7, num_workers=1)
    resumed.load_state_dict(state)
    _same(_take(resumed, 3), rest)
    resumed.close()

    seen = []
    for rank in range(2):
        ld = build_dataloader(cfg, micro_batch_size=1, seed=7, rank=rank, world_size=2, num_workers=0,
                              num_epochs=1)
        seen.append({x["input_ids"].tobytes() + x["images"].tobytes() for x in ld})
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def test_several_datasets_repeat_time_and_data_folder(demo, tmp_path):
    lines = (demo / deepseek_vl2_demo.DATA_FILE).read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[4:6]) + "\n")
    cfg = deepseek_vl2_demo.demo_data_config(demo)
    cfg["dataset_param"]["basic_parameters"] = [
        {"data_path": str(tmp_path / "a.jsonl"), "data_folder": str(demo), "repeat_time": 0.5},
        {"data_path": str(tmp_path / "b.jsonl"), "data_folder": str(demo), "repeat_time": 2}]
    ds = build_deepseek_vl2_dataset(cfg)
    assert [ds.where(i).rsplit("/", 1)[1] for i in range(len(ds))] == [
        "a.jsonl:1", "a.jsonl:2", "b.jsonl:1", "b.jsonl:2", "b.jsonl:1", "b.jsonl:2"]
    np.testing.assert_array_equal(ds[2]["images"], ds[4]["images"])
    cfg["dataset_param"]["basic_parameters"][1]["data_folder"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"basic_parameters\[1\]\.data_folder"):
        build_deepseek_vl2_dataset(cfg)
    del cfg["dataset_param"]["processor_path"]
    with pytest.raises(KeyError, match="dataset_param.processor_path is required"):
        build_deepseek_vl2_dataset(cfg)


def test_loader_feeds_the_model_inputs(demo):
    from ms_mm.models.deepseek_vl2 import MODEL_INPUT_NAMES, DeepseekVL2Config

    cfg = deepseek_vl2_demo.demo_data_config(demo)
    loader = build_dataloader(cfg, DeepseekVL2Config.preset("tiny"), micro_batch_size=3, seed=1, num_workers=0)
    batch = next(loader)
    assert list(batch) == list(MODEL_INPUT_NAMES)
    assert batch["pixel_values"].shape[1:] == (3, 70, 70)


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_bad_records_name_file_and_line(demo, tmp_path):
    good = json.loads((demo / deepseek_vl2_demo.DATA_FILE).read_text().splitlines()[1])
    img = next(p for m in good["conversations"] for p in m.get("images", []))
    two = {"conversations": [{"role": "<|User|>", "content": "<image>Q", "images": [img, img]},
                             {"role": "<|Assistant|>", "content": "A"}]}
    missing = {"conversations": [{"role": "<|User|>", "content": "<image>Q", "images": ["nope.png"]},
                                 {"role": "<|Assistant|>", "content": "A"}]}
    data = tmp_path / "bad.jsonl"
    _write_jsonl(data, [good, '{"conversations": [', two, missing, good])
    cfg = deepseek_vl2_demo.demo_data_config(demo)
    cfg["dataset_param"]["basic_parameters"]["data_path"] = str(data)
    cfg["dataloader_param"]["shuffle"] = False
    ds = build_deepseek_vl2_dataset(cfg)
    with pytest.raises(BadSampleError, match=r"bad\.jsonl:2: malformed json line"):
        ds[1]
    with pytest.raises(BadSampleError, match=r"bad\.jsonl:3: the conversation has 1 <image> tag\(s\) but 2 image"):
        ds[2]
    with pytest.raises(BadSampleError, match=r"bad\.jsonl:4: image not found: .*nope\.png"):
        ds[3]

    strict = build_dataloader(cfg, micro_batch_size=1, num_workers=0)
    assert next(strict)["input_ids"].shape[0] == 1
    with pytest.raises(BadSampleError, match=r"bad\.jsonl:2"):
        next(strict)
    lenient = build_dataloader(cfg, micro_batch_size=2, num_workers=2, skip_bad_samples=True, num_epochs=1)
    assert len(list(lenient)) == 1 and lenient.skipped == 3


# ------------------------------------------------------------- converter + data.json
def _ai2d(tmp_path, records):
    src = tmp_path / "ai2d_train.jsonl"
    _write_jsonl(src, records)
    return src


def _load_converter():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_ai2d_to_dsvl", CONVERTER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_converter_internvl_to_deepseek_vl2(tmp_path, demo):
    img = "images/00001_0.png"
    records = [
        {"id": 7, "image": img, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "Top left."}]},
        {"id": 8, "image": img, "conversations": [  # no tag: InternVL puts the image first
            {"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "A shape."}]},
    ]
    src, out = _ai2d(tmp_path, records), tmp_path / "out" / "dsvl.jsonl"
    res = subprocess.run([sys.executable, str(CONVERTER), str(src), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[0] == {"id": 7, "conversations": [
        {"role": "<|User|>", "content": "<image>\nWhat color is the shape?", "images": [img]},
        {"role": "<|Assistant|>", "content": "Red."},
        {"role": "<|User|>", "content": "Where is it?"}, {"role": "<|Assistant|>", "content": "Top left."}]}
    assert got[1]["conversations"][0] == {"role": "<|User|>", "content": "<image>\nDescribe the image.",
                                          "images": [img]}
    # never overwritten silently; --overwrite replaces
    res = subprocess.run([sys.executable, str(CONVERTER), str(src), str(out)], capture_output=True, text=True)
    assert res.returncode == 1 and "already exists" in res.stderr
    # the example data.json, pointed at the converted file, loads through the shared loader
    cfg = json.loads((REPO / "examples" / "deepseekvl2" / "data.json").read_text())
    assert cfg["dataset_param"]["dataset_type"] == "deepseekvl2"
    basic = cfg["dataset_param"]["basic_parameters"]
    assert {"data_path", "data_folder"} <= set(basic) and "processor_path" in cfg["dataset_param"]
    basic.update(data_path=str(out), data_folder=str(demo))
    cfg["dataset_param"]["processor_path"] = str(deepseek_vl2_tokenizer.asset_dir())
    batch = next(build_dataloader(cfg, micro_batch_size=2, num_workers=0))
    assert batch["input_ids"].shape[0] == 2 and batch["images_spatial_crop"].shape == (2, 1, 2)


def test_converter_errors_and_module_variables(tmp_path, monkeypatch):
    conv = _load_converter()
    bad = _ai2d(tmp_path, [{"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "Q"},
                                                                         {"from": "gpt", "value": "A"}]},
                           '{"id": 2, "image": ', ])
    out = tmp_path / "o.jsonl"
    with pytest.raises(conv.ConversionError, match=r"ai2d_train\.jsonl:2: malformed json"):
        conv.transform_jsonl(str(bad), str(out))
    assert not out.exists() and not Path(str(out) + ".tmp").exists()  # atomic: nothing half-written
    two_tags = _ai2d(tmp_path, [{"id": 3, "image": "a.png", "conversations": [
        {"from": "human", "value": "<image><image>Q"}, {"from": "gpt", "value": "A"}]}])
    with pytest.raises(conv.ConversionError, match=r"ai2d_train\.jsonl:1: 2 <image> tag\(s\) but 1 image"):
        conv.transform_jsonl(str(two_tags), str(out))
    good = _ai2d(tmp_path, [{"id": 4, "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]}])
    monkeypatch.setattr(conv, "input_file", str(good))
    monkeypatch.setattr(conv, "output_file", str(out))
    assert conv.main([]) == 0 and len(out.read_text().splitlines()) == 1
    assert conv.main([]) == 1  # exists
    assert conv.main(["--overwrite"]) == 0


# ------------------------------------------------------------- bundled tiny tokenizer
def test_bundled_tokenizer_is_reproducible_and_fits_the_tiny_model(tmp_path):
    rec = deepseek_vl2_tokenizer.build_tiny_tokenizer(tmp_path)
    bundled = deepseek_vl2_tokenizer.asset_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                 "special_ids.json"):
        assert (tmp_path / name).read_bytes() == (bundled / name).read_bytes(), name
    assert rec == deepseek_vl2_tokenizer.special_ids()
    from ms_mm.models.deepseek_vl2 import DeepseekVL2Config

    tiny = DeepseekVL2Config.preset("tiny")
    assert rec["vocab_size"] == tiny.language_config.vocab_size
    proc_cfg = json.loads((bundled / "processor_config.json").read_text())
    assert [list(r) for r in tiny.candidate_resolutions] == proc_cfg["candidate_resolutions"]
    assert proc_cfg["candidate_resolutions"][0][0] == tiny.vision_config.image_size
    proc = DeepseekVL2DataProcessor(bundled)
    assert (proc.bos_token_id, proc.eos_token_id, proc.pad_token_id, proc.image_token_id) == (
        rec["bos_token_id"], rec["eos_token_id"], rec["pad_token_id"], rec["image_token_id"])
    text = "<|User|>: What color is the shape?\n\n<|Assistant|>:The shape is red.<｜end▁of▁sentence｜>"
    ids = proc.encode(text)
    assert proc.tokenizer.decode(ids) == text and len(ids) < 25

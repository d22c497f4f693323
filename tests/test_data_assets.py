"""The bundled tiny tokenizer, the demo data generator and the LLaVA → mllm_format converter."""
import filecmp
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ms_mm.data import IGNORE_INDEX
from ms_mm.data import demo
from ms_mm.models.qwen2_5_vl.processing import Qwen2VLDataProcessor, build_dataset
from ms_mm.models.qwen2_5_vl.demo import demo_data_config
from ms_mm.models.qwen2_5_vl.tokenizer import (NON_SPECIAL_ADDED_TOKENS, SPECIAL_TOKENS, asset_dir, build_tiny_tokenizer,
                                       copy_assets, special_ids)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------- tokenizer
def test_bundled_tokenizer_loads_with_autotokenizer_and_matches_special_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(asset_dir()))
    ids = special_ids()
    assert type(tok).__name__ == "Qwen2TokenizerFast"
    assert len(tok) == ids["tokenizer_size"] == ids["vocab_size"] == 512
    # Qwen's added tokens, in upstream order, right after the BPE vocabulary
    names = SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS
    assert [tok.convert_tokens_to_ids(t) for t in names] == list(range(512 - len(names), 512))
    assert ids["tokens"] == {t: tok.convert_tokens_to_ids(t) for t in names}
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert (ids["eos_token_id"], ids["pad_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
    assert ids["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    # byte-level: any text round-trips
    text = "Ünïcödé 漢字 and digits 2026\n\ttabs"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_bundled_tokenizer_builder_is_deterministic(tmp_path):
    build_tiny_tokenizer(tmp_path)
    stored = sorted(p.name for p in asset_dir().iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == stored
    for name in stored:
        assert filecmp.cmp(tmp_path / name, asset_dir() / name, shallow=False), name


def test_copied_assets_form_a_processor_dir(tmp_path):
    copied = copy_assets(tmp_path / "hf")
    assert {p.name for p in copied} >= {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                                        "vocab.json", "merges.txt", "chat_template.jinja"}
    assert not (tmp_path / "hf" / "special_ids.json").exists()
    proc = Qwen2VLDataProcessor(tmp_path / "hf")
    assert (proc.min_pixels, proc.max_pixels) == (56 * 56, 112 * 112)
    assert proc.image_token_id == special_ids()["image_token_id"]


def test_python_template_equals_bundled_jinja_template(tmp_path):
    """The processor's qwen2vl rendering and the stored chat template (used by HF tools) agree."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(asset_dir()))
    img = tmp_path / "a.png"
    Image.new("RGB", (56, 56), (200, 10, 10)).save(img)
    proc = Qwen2VLDataProcessor(asset_dir())
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "The shape is red."}]},
             {"role": "user", "content": [{"type": "text", "text": "And where is it?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "It is in the top left."}]}]
    out = proc(typed, [img])
    rendered = tok.apply_chat_template(typed, tokenize=False)
    assert tok.decode(out["input_ids"]).replace("<|image_pad|>" * 4, "<|image_pad|>") == rendered
    assert tok.decode(out["labels"][out["labels"] != IGNORE_INDEX]) == \
        "The shape is red.<|im_end|>It is in the top left.<|im_end|>"


# -------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.make_demo_dataset(root, n=48, seed=1)
    return root


def _dominant_colour(pixels, background):
    px = pixels.reshape(-1, 3).astype(int)
    px = px[np.abs(px - np.array(background)).sum(1) > 60]  # drop background (incl. its jitter)
    if len(px) == 0:
        return None
    colours = {name: np.abs(px - np.array(rgb)).sum(1) for name, rgb in demo.COLORS.items()}
    votes = {name: int((d < 40).sum()) for name, d in colours.items()}
    return max(votes, key=votes.get)


def test_demo_answers_are_visible_in_the_image(demo_dir):
    """Describe answers name colour, shape position and background; the pixels agree."""
    records = json.loads((demo_dir / demo.DATA_FILE).read_text())
    assert len(records) == 48
    checked = 0
    for rec in records:
        answer = rec["messages"][-1]["content"]
        if rec["messages"][0]["content"] != "<image>" + demo.Q_DESCRIBE:
            continue
        match = re.fullmatch(r"An? (\w+) (\w+) in the (\w+ \w+) on a (\w+) background\.", answer)
        color, shape, position, background = match.groups()
        assert shape in demo.SHAPES and position in demo.POSITIONS
        img = np.asarray(Image.open(demo_dir / rec["images"][0]).convert("RGB"))
        h, w = img.shape[:2]
        rows = slice(h // 2, h) if position.startswith("bottom") else slice(0, h // 2)
        cols = slice(w // 2, w) if position.endswith("right") else slice(0, w // 2)
        bg = demo.BACKGROUNDS[background]
        assert _dominant_colour(img[rows, cols], bg) == color, (rec, answer)
        others = img.copy()
        others[rows, cols] = bg
        assert _dominant_colour(others, bg) is None  # nothing drawn outside the named quadrant
        checked += 1
    assert checked >= 5


def test_demo_data_is_deterministic_and_well_formed(demo_dir, tmp_path):
    again = demo.make_demo_dataset(tmp_path, n=48, seed=1)
    assert again.read_text() == (demo_dir / demo.DATA_FILE).read_text()
    records = json.loads(again.read_text())
    kinds = {len(r["messages"]) for r in records}
    assert {2, 6} <= kinds  # single- and multi-turn samples
    assert any(len(r["images"]) == 2 for r in records)
    for r in records:
        n_placeholders = sum(m["content"].count("<image>") for m in r["messages"])
        assert n_placeholders == len(r["images"])
        for p in r["images"]:
            with Image.open(tmp_path / p) as im:
                assert im.size[0] in demo.SIDES and im.size[1] in demo.SIDES
                assert np.array_equal(np.asarray(im), np.asarray(Image.open(demo_dir / p)))
    cfg = demo_data_config(tmp_path)
    ds = build_dataset(cfg)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    # every sample fits the demo cutoff, and each image costs 4..16 tokens under the tiny budget
    assert max(lengths) <= cfg["dataset_param"]["basic_parameters"]["cutoff_len"]
    grids = np.concatenate([ds[i]["image_grid_thw"] for i in range(len(ds))])
    tokens = grids.prod(1) // 4
    assert tokens.min() >= 4 and tokens.max() <= 16


def test_demo_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ms_mm.data.demo", "--out", str(tmp_path), "--n", "5"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / demo.DATA_FILE).read_text())) == 5


# ------------------------------------------------------------------- llava
LLAVA = [
    {"id": "1", "image": "000000000001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "A red cup."},
        {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "Red."}]},
    {"id": "2", "image": "000000000002.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Missing image."}]},
    {"id": "3", "conversations": [
        {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
]
SCRIPT = REPO / "examples" / "qwen2vl" / "llava_instruct_2_mllm_demo_format.py"


def _run(cwd, *args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_llava_converter_with_guide_defaults(tmp_path):
    (tmp_path / "data" / "COCO2017" / "train2017").mkdir(parents=True)
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "data/COCO2017/train2017/000000000001.jpg")
    (tmp_path / "data" / "llava_instruct_150k.json").write_text(json.dumps(LLAVA))
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 left out" in r.stdout
    out = json.loads((tmp_path / "data" / "mllm_format_llava_instruct_data.json").read_text())
    assert out == [
        {"images": ["./data/COCO2017/train2017/000000000001.jpg"], "messages": [
            {"role": "user", "content": "<image>\nWhat is on the table?"},
            {"role": "assistant", "content": "A red cup."},
            {"role": "user", "content": "What color is it?"}, {"role": "assistant", "content": "Red."}]},
        {"images": [], "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
    ]
    # an existing output is kept
    r = _run(tmp_path)
    assert r.returncode == 1 and "already exists" in r.stderr


def test_llava_converter_output_feeds_the_dataset(tmp_path, monkeypatch):
    img_dir = tmp_path / "coco"
    img_dir.mkdir()
    Image.new("RGB", (64, 48), (255, 0, 0)).save(img_dir / "000000000001.jpg")
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(LLAVA[:1] + [{**LLAVA[2], "conversations": [{"from": "robot", "value": "x"}]}]))
    r = _run(tmp_path, "--input", str(src), "--image-dir", str(img_dir), "--output", str(tmp_path / "o.json"))
    assert r.returncode == 1 and "record 1" in r.stderr and "robot" in r.stderr
    assert not (tmp_path / "o.json").exists()
    src.write_text(json.dumps(LLAVA))
    r = _run(tmp_path, "--input", str(src), "--image-dir", "coco", "--output", "o.json")
    assert r.returncode == 0, r.stderr
    monkeypatch.chdir(tmp_path)  # image paths are relative to the working directory, as upstream
    cfg = demo_data_config(tmp_path)
    cfg["dataset_param"]["basic_parameters"].update(dataset="o.json", dataset_dir="./data", cutoff_len=1024)
    ds = build_dataset(cfg)
    first = ds[0]
    assert first["image_grid_thw"].tolist() == [[1, 4, 4]]  # 48x64 -> 56x56 px (round to 28) -> 4x4 patches
    tok = ds.processor.tokenizer
    assert tok.decode(first["labels"][first["labels"] != IGNORE_INDEX]) == "A red cup.<|im_end|>Red.<|im_end|>"
    assert len(ds[1]["image_grid_thw"]) == 0


def test_demo_fixed_shape_option(tmp_path):
    demo.make_demo_dataset(tmp_path, n=16, seed=0, sides=(84,), two_images=False)
    records = json.loads((tmp_path / demo.DATA_FILE).read_text())
    assert all(len(r["images"]) == 1 for r in records)
    for r in records:
        with Image.open(tmp_path / r["images"][0]) as im:
            assert im.size == (84, 84)
    with pytest.raises(ValueError, match="multiple of 28"):
        demo.make_demo_dataset(tmp_path, n=1, sides=(60,))

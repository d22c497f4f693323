"""Qwen2VLDataProcessor against the reference fixtures made by transformers' Qwen2_5_VLProcessor."""
import json

import numpy as np
import pytest
from PIL import Image

from ms_mm.data import BadSampleError, IGNORE_INDEX
from ms_mm.models.qwen2_5_vl.processing import Qwen2VLDataProcessor

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "labels")


@pytest.fixture(scope="module")
def case(fixture_root):
    d = fixture_root / "qwen2_5_vl" / "processor"
    return {
        "dir": d,
        "processor": Qwen2VLDataProcessor(d / "hf_processor"),
        "messages": json.loads((d / "conversation.json").read_text())["messages"],
        "image": d / "image.png",
        "expected": dict(np.load(d / "expected.npz")),
        "info": json.loads((d / "processor_info.json").read_text()),
    }


def _check_equal(out, expected):
    for k in KEYS:
        exp = expected[k][0] if k in ("input_ids", "attention_mask", "labels") else expected[k]
        assert out[k].dtype == exp.dtype, k
        assert out[k].shape == exp.shape, k
        np.testing.assert_array_equal(out[k], exp, err_msg=k)


def test_processor_reproduces_fixture_exactly(case):
    out = case["processor"](case["messages"], [case["image"]])
    _check_equal(out, case["expected"])
    # the rendered text before pad expansion is the fixture's too
    tok = case["processor"].tokenizer
    n = case["info"]["num_image_tokens"]
    text = tok.decode(out["input_ids"]).replace("<|image_pad|>" * n, "<|image_pad|>")
    assert text == case["info"]["rendered_text_before_expansion"]


def test_processor_reproduces_forward_inputs(fixture_root):
    d = fixture_root / "qwen2_5_vl" / "forward"
    proc = Qwen2VLDataProcessor(d / "hf")
    messages = json.loads((d / "conversation.json").read_text())["messages"]
    _check_equal(proc(messages, [d / "image.png"]), dict(np.load(d / "inputs.npz")))


def _as_mllm_strings(messages):
    """The fixture conversation in mllm_format: string content with <image> placeholders."""
    out = []
    for m in messages:
        text = "".join("<image>" if c["type"] == "image" else c["text"] for c in m["content"])
        out.append({"role": m["role"], "content": text})
    return out


def test_mllm_placeholder_form_gives_same_result(case):
    msgs = _as_mllm_strings(case["messages"])
    assert msgs[0]["content"] == "<image>What is in the picture?"
    _check_equal(case["processor"](msgs, [str(case["image"])]), case["expected"])


def test_explicit_system_message_is_used(case):
    msgs = [{"role": "system", "content": "You are a helpful assistant."}] + _as_mllm_strings(case["messages"])
    _check_equal(case["processor"](msgs, [case["image"]]), case["expected"])
    other = case["processor"](_as_mllm_strings(case["messages"]), [case["image"]], system="Be brief.")
    text = case["processor"].tokenizer.decode(other["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")


def test_pixel_budget_follows_smart_resize(case):
    # processor_info: 150x200 -> 84x112 under [3136, 12544] -> 6x8 patches
    assert tuple(case["expected"]["image_grid_thw"][0]) == (1, 6, 8)
    # max_pixels 3136: beta = sqrt(150*200/3136); floor(150/beta/28)*28 = 28, floor(200/beta/28)*28 = 56
    small = Qwen2VLDataProcessor(case["dir"] / "hf_processor", min_pixels=0, max_pixels=3136)
    out = small(_as_mllm_strings(case["messages"]), [case["image"]])
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 2, 4]])
    assert out["pixel_values"].shape == (8, 1176)
    assert int((out["input_ids"] == 359).sum()) == 2


def _label_runs(labels):
    """[(start, end)] of the supervised runs."""
    on = np.concatenate([[False], labels != IGNORE_INDEX, [False]])
    edges = np.flatnonzero(on[1:] != on[:-1])
    return list(zip(edges[::2], edges[1::2]))


def test_mask_history_and_train_on_prompt(case):
    exp_labels = case["expected"]["labels"][0]
    ids = case["expected"]["input_ids"][0]
    runs = _label_runs(exp_labels)
    assert len(runs) == 2  # two assistant replies
    d = case["dir"] / "hf_processor"
    msgs = _as_mllm_strings(case["messages"])
    last_only = Qwen2VLDataProcessor(d, mask_history=True)(msgs, [case["image"]])["labels"]
    want = exp_labels.copy()
    want[runs[0][0]:runs[0][1]] = IGNORE_INDEX
    np.testing.assert_array_equal(last_only, want)
    everything = Qwen2VLDataProcessor(d, train_on_prompt=True)(msgs, [case["image"]])["labels"]
    np.testing.assert_array_equal(everything, ids)


def test_cutoff_len_truncates_text_but_never_an_image(case):
    d = case["dir"] / "hf_processor"
    msgs = _as_mllm_strings(case["messages"])
    out = Qwen2VLDataProcessor(d, cutoff_len=110)(msgs, [case["image"]])
    np.testing.assert_array_equal(out["input_ids"], case["expected"]["input_ids"][0][:110])
    np.testing.assert_array_equal(out["labels"], case["expected"]["labels"][0][:110])
    with pytest.raises(BadSampleError, match="cut through an image"):
        Qwen2VLDataProcessor(d, cutoff_len=20)(msgs, [case["image"]])


def test_bad_samples_raise_clear_errors(case, tmp_path):
    proc = case["processor"]
    msgs = _as_mllm_strings(case["messages"])
    with pytest.raises(BadSampleError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        proc(msgs, [case["image"], case["image"]])
    with pytest.raises(BadSampleError, match=r"image not found: .*nope\.png"):
        proc(msgs, [tmp_path / "nope.png"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(BadSampleError, match=r"cannot read image .*broken\.png"):
        proc(msgs, [broken])
    with pytest.raises(BadSampleError, match="no assistant turn"):
        proc([{"role": "user", "content": "<image>hi"}], [case["image"]])
    with pytest.raises(BadSampleError, match="literal token"):
        proc([{"role": "user", "content": "<|image_pad|>hi"}, {"role": "assistant", "content": "x"}], [])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (10, 3000)).save(tiny)  # aspect ratio 300 > 200
    with pytest.raises(BadSampleError, match=r"tiny\.png.*aspect ratio"):
        proc([{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}], [tiny])


def test_text_only_sample(case):
    out = case["processor"]([{"role": "user", "content": "What color is the box?"},
                             {"role": "assistant", "content": "The box is red."}])
    assert out["pixel_values"].shape == (0, 1176) and out["image_grid_thw"].shape == (0, 3)
    tok = case["processor"].tokenizer
    assert tok.decode(out["labels"][out["labels"] != IGNORE_INDEX]) == "The box is red.<|im_end|>"


def test_release_style_preprocessor_config(case, tmp_path):
    """Released Qwen2.5-VL checkpoints give min/max_pixels at top level, without `size`."""
    import shutil

    d = tmp_path / "proc"
    shutil.copytree(case["dir"] / "hf_processor", d)
    cfg = json.loads((d / "preprocessor_config.json").read_text())
    del cfg["size"]
    cfg["processor_class"] = "Qwen2_5_VLProcessor"
    (d / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc = Qwen2VLDataProcessor(d)
    assert (proc.min_pixels, proc.max_pixels) == (3136, 12544)
    _check_equal(proc(case["messages"], [case["image"]]), case["expected"])
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Qwen2VLDataProcessor(tmp_path)

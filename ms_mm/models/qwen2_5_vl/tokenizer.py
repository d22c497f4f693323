"""The bundled tiny Qwen2-style tokenizer: how it is built, where it lives, which ids it uses.

`ms_mm/models/qwen2_5_vl/assets/` holds a small byte-level BPE tokenizer in the layout of a
Qwen2.5-VL checkpoint's processor files (tokenizer.json, vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json, chat template, preprocessor_config.json for the
slow `Qwen2VLImageProcessor`) plus `special_ids.json`, which the tiny-model builder reads to size
the vocabulary and fill in the token-id fields of the model config.

It exists so every example can run end to end on a machine with no downloaded weights: the tiny
model is built around it and the demo data (`ms_mm.data.demo`) is written in words it encodes in
a few tokens. `build_tiny_tokenizer(out_dir)` regenerates the stored files deterministically
(the shared steps are `ms_mm.data.tiny_tokenizer`'s):

    python -m ms_mm.models.qwen2_5_vl.tokenizer [OUT_DIR]      # default: the bundled asset directory
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ms_mm.data.tiny_tokenizer import BundledTokenizer, add_tokens, added_token_ids, train_byte_level_bpe, write_json

ASSET_DIR = Path(__file__).resolve().parent / "assets"
BUNDLED = BundledTokenizer(ASSET_DIR, "python -m ms_mm.models.qwen2_5_vl.tokenizer")

# Qwen2.5 / Qwen2.5-VL added tokens in their upstream order (151643..151664 in the real
# vocabulary); the last eight are added but not "special" upstream, so decoding keeps them.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
NON_SPECIAL_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

# Total vocabulary = BPE tokens + added tokens; 512 keeps embedding tables tiny and aligned.
VOCAB_SIZE = 512
BPE_VOCAB_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(NON_SPECIAL_ADDED_TOKENS)

# Qwen2's pre-tokenizer split (digits one by one, contractions, letters with one leading mark).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL's chat template (the Qwen2-VL-Instruct release): default system prompt, string or
# typed-list content, optional "Picture N:" ids.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Slow Qwen2VLImageProcessor settings: the real model's patching and CLIP normalisation, with a
# small pixel budget so 56..112 px demo images give 4..16 image tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112
PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "max_pixels": TINY_MAX_PIXELS,
    "min_pixels": TINY_MIN_PIXELS,
    "merge_size": 2,
    "patch_size": 14,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"longest_edge": TINY_MAX_PIXELS, "shortest_edge": TINY_MIN_PIXELS},
    "temporal_patch_size": 2,
}


def _training_corpus() -> list[str]:
    """Text the BPE merges are learned from: chat-template words, the demo data's vocabulary and
    some plain English, so demo answers are a few tokens each and any other text still encodes
    (every byte is in the base alphabet)."""
    from ms_mm.data import demo  # the demo vocabulary lives with the demo generator

    lines = [
        "system", "user", "assistant", "You are a helpful assistant.",
        "Picture 1: Picture 2: Video 1:",
        "Describe the image. What is in the picture? What color is the box? The box is red.",
        "A blue sky over a red box. A cat sitting on a mat. What color is the sky? It is blue.",
    ]
    lines += demo.vocabulary_sentences()
    lines += [
        "The quick brown fox jumps over the lazy dog. A small model learns from a few examples.",
        "This is a picture of a street with cars, people and a building. There are two dogs on",
        "the grass and a man is holding a frisbee. The table has a plate with food and a cup.",
        "Please answer the question about the image in one short sentence, then explain why.",
        "Numbers 0 1 2 3 4 5 6 7 8 9 are split into single digits. Yes, no, maybe; left or right?",
        "What is the person doing? How many animals can you see? Where is the train going?",
    ]
    return lines


def build_tiny_tokenizer(out_dir: str | os.PathLike = ASSET_DIR) -> dict:
    """(Re)generate the tiny tokenizer files in `out_dir`; returns the special-id record.

    Deterministic: the same library versions give byte-identical files."""
    from transformers import Qwen2TokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = train_byte_level_bpe(_training_corpus(), BPE_VOCAB_SIZE, QWEN2_SPLIT_REGEX, byte_level_post_processor=True)
    n_bpe = bpe.get_vocab_size()
    # Added tokens go in first, in upstream order, so their ids are contiguous after the BPE ids.
    add_tokens(bpe, SPECIAL_TOKENS, NON_SPECIAL_ADDED_TOKENS)
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768, clean_up_tokenization_spaces=False, split_special_tokens=False,
        errors="replace", add_prefix_space=False,
    )
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir))
    ids = added_token_ids(tok, SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS, n_bpe, VOCAB_SIZE)
    record = {
        "vocab_size": VOCAB_SIZE,
        "tokenizer_size": len(tok),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "tokens": ids,
    }
    write_json(out_dir / "special_ids.json", record)
    write_json(out_dir / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    return record


# the bundled directory (a processor dir, and the files a tiny checkpoint carries), its id record,
# and copying it into a checkpoint (every file but special_ids.json)
asset_dir, special_ids, copy_assets = BUNDLED.asset_dir, BUNDLED.special_ids, BUNDLED.copy_assets


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else ASSET_DIR
    rec = build_tiny_tokenizer(target)
    print(f"wrote tiny tokenizer to {target}: {json.dumps({k: v for k, v in rec.items() if k != 'tokens'})}")

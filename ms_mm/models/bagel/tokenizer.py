"""The bundled tiny BAGEL tokenizer: a Qwen2-style byte-level BPE in the release's file layout.

`ms_mm/models/bagel/assets/` holds `tokenizer.json`, `vocab.json`, `merges.txt`,
`tokenizer_config.json`, `special_tokens_map.json` (loads as `Qwen2TokenizerFast`, as BAGEL's
`Qwen2Tokenizer.from_pretrained(model_path)`) with the Qwen2.5 added tokens in upstream order —
BAGEL uses `<|im_start|>` as bos, `<|im_end|>` as eos and `<|vision_start|>` / `<|vision_end|>` as
the image delimiters (`data_utils.add_special_tokens`) — and `special_ids.json` (vocabulary size,
those ids) for the tiny-model builder. Built with `ms_mm.data.tiny_tokenizer` from the demo
vocabulary (`ms_mm.models.bagel.demo`):

    python -m ms_mm.models.bagel.tokenizer [OUT_DIR]      # default: the bundled asset directory
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ms_mm.data.tiny_tokenizer import BundledTokenizer, add_tokens, added_token_ids, train_byte_level_bpe, write_json

ASSET_DIR = Path(__file__).resolve().parent / "assets"
BUNDLED = BundledTokenizer(ASSET_DIR, "python -m ms_mm.models.bagel.tokenizer")

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
VOCAB_SIZE = 384          # = BagelConfig.preset("tiny").llm.vocab_size
BPE_VOCAB_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS)
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _training_corpus() -> list:
    from ms_mm.models.bagel import demo

    return demo.vocabulary_sentences() + [
        "The quick brown fox jumps over the lazy dog. A small model learns from a few examples.",
        "Describe the image. What is in the picture? Numbers 0 1 2 3 4 5 6 7 8 9. Yes, no; left or right?",
        "a red circle on a blue background", "make the circle green", "What colour is the shape?",
    ]


def build_tiny_tokenizer(out_dir=ASSET_DIR) -> dict:
    """(Re)generate the tokenizer files in `out_dir`; returns the special-id record."""
    from transformers import Qwen2TokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = train_byte_level_bpe(_training_corpus(), BPE_VOCAB_SIZE, QWEN2_SPLIT_REGEX, byte_level_post_processor=True)
    n_bpe = bpe.get_vocab_size()
    add_tokens(bpe, SPECIAL_TOKENS)
    tok = Qwen2TokenizerFast(
        tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=32768, clean_up_tokenization_spaces=False,
        split_special_tokens=False, errors="replace", add_prefix_space=False)
    tok.save_pretrained(str(out_dir))
    ids = added_token_ids(tok, SPECIAL_TOKENS, n_bpe, VOCAB_SIZE)
    record = {"vocab_size": VOCAB_SIZE, "tokenizer_size": len(tok), "pad_token_id": ids["<|endoftext|>"],
              "bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"],
              "start_of_image": ids["<|vision_start|>"], "end_of_image": ids["<|vision_end|>"], "tokens": ids}
    write_json(out_dir / "special_ids.json", record)
    return record


def special_token_ids(tokenizer) -> dict:
    """BAGEL's four special ids from any Qwen2 tokenizer (upstream `add_special_tokens` names)."""
    ids = {"bos_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>", "start_of_image": "<|vision_start|>",
           "end_of_image": "<|vision_end|>"}
    out = {}
    for key, token in ids.items():
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
            raise ValueError(f"tokenizer lacks the BAGEL special token {token!r} ({key})")
        out[key] = int(tid)
    return out


asset_dir, special_ids, copy_assets = BUNDLED.asset_dir, BUNDLED.special_ids, BUNDLED.copy_assets


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else ASSET_DIR
    rec = build_tiny_tokenizer(target)
    print(f"wrote tiny BAGEL tokenizer to {target}: " + json.dumps({k: v for k, v in rec.items() if k != "tokens"}))

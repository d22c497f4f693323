"""The bundled tiny DeepSeek-VL2 tokenizer + processor config: how they are built, where they live.

`ms_mm/models/deepseek_vl2/assets/` holds, in the layout of a DeepSeek-VL2 checkpoint's
processor files, a small byte-level BPE tokenizer (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`; loads as `LlamaTokenizerFast`) with the DeepSeek-VL2 special tokens,
and a `processor_config.json` for `DeepseekVL2DataProcessor` with 70 px tiles (patch 14,
downsample 2: 3 x 3 tokens a tile) and candidate resolutions up to 140 x 140 — the shape of the
`DeepseekVL2Config.preset("tiny")` model. `special_ids.json` records the vocabulary size (384,
the tiny preset's) and the token ids, for whoever builds the tiny model around it.

The demo data (`ms_mm.data.demo`, converted by `ms_mm.models.deepseek_vl2.demo`) is written in words
this tokenizer encodes in a few tokens. Regenerate the files deterministically with

    python -m ms_mm.models.deepseek_vl2.tokenizer [OUT_DIR]    # default: the bundled asset directory
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ms_mm.data.tiny_tokenizer import BundledTokenizer, add_tokens, added_token_ids, train_byte_level_bpe, write_json

ASSET_DIR = Path(__file__).resolve().parent / "assets"
BUNDLED = BundledTokenizer(ASSET_DIR, "python -m ms_mm.models.deepseek_vl2.tokenizer")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# Upstream order: the DeepSeek LLM's bos/eos/pad, then what DeepseekVLV2Processor adds: the image
# tag, five grounding tokens, the two chat roles.
SPECIAL_TOKENS = [BOS, EOS, PAD, "<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
                  "<|User|>", "<|Assistant|>"]

VOCAB_SIZE = 384  # = DeepseekVL2Config.preset("tiny").language_config.vocab_size
BPE_VOCAB_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS)

# Split rule before byte-level BPE: letters with one leading mark, single digits, punctuation runs.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TILE = 70
PROCESSOR_CONFIG = {
    "candidate_resolutions": [[TILE, TILE], [TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]],
    "patch_size": 14,
    "downsample_ratio": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "normalize": True,
    "image_token": "<image>",
    "pad_token": PAD,
    "add_special_token": False,
    "sft_format": "deepseek",
    "mask_prompt": True,
    "ignore_id": -100,
    "processor_class": "DeepseekVLV2Processor",
}


def _training_corpus() -> list[str]:
    """Text the merges are learned from: the chat format, the demo vocabulary, some English
    (every byte is in the base alphabet, so any text still encodes)."""
    from ms_mm.data import demo

    lines = [
        "<|User|>: \n\n<|Assistant|>:", ": \n\n",
        "Describe the image. What is in the picture? What color is the box? The box is red.",
        "A blue sky over a red box. A cat sitting on a mat. What color is the sky? It is blue.",
    ]
    lines += demo.vocabulary_sentences()
    lines += [
        "The quick brown fox jumps over the lazy dog. A small model learns from a few examples.",
        "Which of the following is shown in the diagram? Answer with the option's letter from the",
        "given choices directly. A. B. C. D. Options: the sun, the moon, the earth, a plant, water.",
        "Numbers 0 1 2 3 4 5 6 7 8 9 are split into single digits. Yes, no, maybe; left or right?",
    ]
    return lines


def build_tiny_tokenizer(out_dir: str | os.PathLike = ASSET_DIR) -> dict:
    """(Re)generate the tokenizer + processor files in `out_dir`; returns the special-id record.
    Deterministic: the same library versions give byte-identical files."""
    from transformers import LlamaTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = train_byte_level_bpe(_training_corpus(), BPE_VOCAB_SIZE, SPLIT_REGEX)
    n_bpe = bpe.get_vocab_size()
    add_tokens(bpe, SPECIAL_TOKENS)
    tok = LlamaTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        add_bos_token=False, add_eos_token=False, legacy=False, clean_up_tokenization_spaces=False,
        additional_special_tokens=["<|User|>", "<|Assistant|>"], model_max_length=4096,
        use_default_system_prompt=False)
    tok.save_pretrained(str(out_dir))
    ids = added_token_ids(tok, SPECIAL_TOKENS, n_bpe, VOCAB_SIZE)
    record = {
        "vocab_size": VOCAB_SIZE, "tokenizer_size": len(tok),
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
        "image_token_id": ids["<image>"], "tokens": ids,
    }
    write_json(out_dir / "special_ids.json", record)
    write_json(out_dir / "processor_config.json", PROCESSOR_CONFIG)
    return record


# the bundled directory (a processor dir, and the files a tiny checkpoint carries), its id record,
# and copying it into a checkpoint (every file but special_ids.json)
asset_dir, special_ids, copy_assets = BUNDLED.asset_dir, BUNDLED.special_ids, BUNDLED.copy_assets


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else ASSET_DIR
    rec = build_tiny_tokenizer(target)
    print(f"wrote tiny DeepSeek-VL2 tokenizer to {target}: "
          + json.dumps({k: v for k, v in rec.items() if k != "tokens"}))

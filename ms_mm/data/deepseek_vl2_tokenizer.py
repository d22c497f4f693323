"""The bundled tiny DeepSeek-VL2 tokenizer + processor config: how they are built, where they live.

`ms_mm/assets/deepseek_vl2_tokenizer/` holds, in the layout of a DeepSeek-VL2 checkpoint's
processor files, a small byte-level BPE tokenizer (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`; loads as `LlamaTokenizerFast`) with the DeepSeek-VL2 special tokens,
and a `processor_config.json` for `DeepseekVL2DataProcessor` with 70 px tiles (patch 14,
downsample 2: 3 x 3 tokens a tile) and candidate resolutions up to 140 x 140 — the shape of the
`DeepseekVL2Config.preset("tiny")` model. `special_ids.json` records the vocabulary size (384,
the tiny preset's) and the token ids, for whoever builds the tiny model around it.

The demo data (`ms_mm.data.demo`, converted by `ms_mm.data.deepseek_vl2_demo`) is written in words
this tokenizer encodes in a few tokens. Regenerate the files deterministically with

    python -m ms_mm.data.deepseek_vl2_tokenizer [OUT_DIR]    # default: the bundled asset directory
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "deepseek_vl2_tokenizer"

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
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator(_training_corpus() * 3, trainer=trainer)
    n_bpe = bpe.get_vocab_size()
    if n_bpe != BPE_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer corpus too small: learned {n_bpe} BPE tokens, need {BPE_VOCAB_SIZE}")
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = LlamaTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        add_bos_token=False, add_eos_token=False, legacy=False, clean_up_tokenization_spaces=False,
        additional_special_tokens=["<|User|>", "<|Assistant|>"], model_max_length=4096,
        use_default_system_prompt=False)
    tok.save_pretrained(str(out_dir))

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if ids != {t: n_bpe + i for i, t in enumerate(SPECIAL_TOKENS)} or len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer special tokens are not contiguous: {ids}")
    record = {
        "vocab_size": VOCAB_SIZE, "tokenizer_size": len(tok),
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
        "image_token_id": ids["<image>"], "tokens": ids,
    }
    _write_json(out_dir / "special_ids.json", record)
    _write_json(out_dir / "processor_config.json", PROCESSOR_CONFIG)
    return record


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


def asset_dir() -> Path:
    """The bundled processor directory (a `processor_path` for `DeepseekVL2DataProcessor`)."""
    if not (ASSET_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(f"bundled tiny DeepSeek-VL2 tokenizer missing at {ASSET_DIR}; regenerate it "
                                "with `python -m ms_mm.data.deepseek_vl2_tokenizer`")
    return ASSET_DIR


def special_ids() -> dict:
    """The bundled tokenizer's id record (`special_ids.json`)."""
    with open(asset_dir() / "special_ids.json", encoding="utf-8") as f:
        return json.load(f)


def copy_assets(dst_dir: str | os.PathLike) -> list[Path]:
    """Copy the tokenizer + processor files (not `special_ids.json`) into an HF checkpoint
    directory, as a released DeepSeek-VL2 checkpoint carries them; returns the copies."""
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(src, dst_dir / src.name)) for src in sorted(asset_dir().iterdir())
            if src.is_file() and src.name != "special_ids.json"]


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else ASSET_DIR
    rec = build_tiny_tokenizer(target)
    print(f"wrote tiny DeepSeek-VL2 tokenizer to {target}: "
          + json.dumps({k: v for k, v in rec.items() if k != "tokens"}))

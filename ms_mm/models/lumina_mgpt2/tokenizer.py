"""The bundled tiny Lumina-mGPT 2.0 tokenizer: how it is built, where it lives.

`ms_mm/models/lumina_mgpt2/assets/` holds, in the layout of the released checkpoint's tokenizer
files, a small byte-level BPE (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`;
loads as `LlamaTokenizerFast`) followed by the added tokens the image layout names, under their
released names: `<s>`, `<pad>`, `</s>`, `<eoss>` (image end), `<racm3:break>` (image start),
`<reserved08706>` (turn separator), `<reserved08799>` (row newline), `<reserved08800>` ..
`<reserved08808>` (grid counts 0..8) and `<MOVQGAN0>` .. `<MOVQGAN63>` (the tiny MoVQGAN's 64 codes,
contiguous, so code c is `<MOVQGAN0>` + c as upstream's `code + 155000`). `special_ids.json` records
the vocabulary size and the ids. The tiny model's `vocabulary_map` is this vocabulary, so
`LuminaTokenConfig.from_vocabulary_map` finds the ids by name exactly as for the release.

Regenerate deterministically with

    python -m ms_mm.models.lumina_mgpt2.tokenizer [OUT_DIR]    # default: the bundled asset directory
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ms_mm.data.tiny_tokenizer import BundledTokenizer, add_tokens, added_token_ids, train_byte_level_bpe, write_json

ASSET_DIR = Path(__file__).resolve().parent / "assets"
BUNDLED = BundledTokenizer(ASSET_DIR, "python -m ms_mm.models.lumina_mgpt2.tokenizer")

BOS, PAD, EOS = "<s>", "<pad>", "</s>"
IMAGE_START, IMAGE_END, SEPARATOR, NEWLINE = "<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08799>"
MAX_GRIDS = 8                 # <reserved08800> .. <reserved08808>: up to 8 grids of 32 px per side
CODEBOOK_SIZE = 64            # = MoVQGANConfig.preset("tiny").n_embed
GRID_TOKENS = [f"<reserved{8800 + n:05d}>" for n in range(MAX_GRIDS + 1)]
CODE_TOKENS = [f"<MOVQGAN{c}>" for c in range(CODEBOOK_SIZE)]
SPECIAL_TOKENS = [BOS, PAD, EOS, IMAGE_END, IMAGE_START, SEPARATOR, NEWLINE, *GRID_TOKENS, *CODE_TOKENS]

VOCAB_SIZE = 512
BPE_VOCAB_SIZE = VOCAB_SIZE - len(SPECIAL_TOKENS)

SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _training_corpus() -> list[str]:
    """The prompt templates of the item processor and the demo captions (any text still encodes)."""
    from ms_mm.data import demo
    from ms_mm.models.lumina_mgpt2.processing import t2i_prompt

    captions = [s for s in demo.vocabulary_sentences() if s.startswith(("A ", "An "))]
    lines = [t2i_prompt(c, w, h) for c in captions[:24] for w, h in ((64, 64), (96, 32), (32, 128))]
    lines += [t2i_prompt(c, None, None) for c in captions[:8]]
    lines += captions
    lines += ["The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a red mat.",
              "Numbers 0 1 2 3 4 5 6 7 8 9 are single digits. x",
              "A photograph of a mountain lake at sunset, with pine trees and snow on the peaks.",
              "An oil painting of a small village by the sea; boats, houses and a lighthouse.",
              "A close up of a flower with green leaves, soft light, high detail, in the style of a sketch.",
              "A dog running on the beach. A bowl of fruit on a wooden table. A city street at night."]
    return lines


def build_tiny_tokenizer(out_dir: str | os.PathLike = ASSET_DIR) -> dict:
    """(Re)generate the tokenizer files in `out_dir`; returns the special-id record."""
    from transformers import LlamaTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = train_byte_level_bpe(_training_corpus(), BPE_VOCAB_SIZE, SPLIT_REGEX)
    n_bpe = bpe.get_vocab_size()
    add_tokens(bpe, SPECIAL_TOKENS)
    tok = LlamaTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
                             add_bos_token=False, add_eos_token=False, legacy=False,
                             clean_up_tokenization_spaces=False, model_max_length=4096)
    tok.save_pretrained(str(out_dir))
    ids = added_token_ids(tok, SPECIAL_TOKENS, n_bpe, VOCAB_SIZE)
    record = {"vocab_size": VOCAB_SIZE, "tokenizer_size": len(tok), "bos_token_id": ids[BOS],
              "eos_token_id": ids[EOS], "pad_token_id": ids[PAD], "codebook_size": CODEBOOK_SIZE, "tokens": ids}
    write_json(out_dir / "special_ids.json", record)
    return record


def vocabulary_map(tokenizer_dir: str | os.PathLike = ASSET_DIR) -> dict:
    """{token: id} of the whole vocabulary (the checkpoint config's `vocabulary_map`)."""
    tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(tok["model"]["vocab"])
    vocab.update({t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])})
    return dict(sorted(vocab.items(), key=lambda kv: kv[1]))


asset_dir, special_ids, copy_assets = BUNDLED.asset_dir, BUNDLED.special_ids, BUNDLED.copy_assets


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else ASSET_DIR
    rec = build_tiny_tokenizer(target)
    print(f"wrote tiny Lumina-mGPT 2.0 tokenizer to {target}: "
          + json.dumps({k: v for k, v in rec.items() if k != "tokens"}))

"""The shared builder of the bundled tiny tokenizers (one per family, each in its family folder).

Every family's embedded default needs a tokenizer in its checkpoint's on-disk layout that encodes
the demo data in a few tokens. They are all the same kind: a byte-level BPE learned from a small
fixed corpus (so any text still encodes: every byte is in the base alphabet), then the family's
added tokens appended in upstream order right after the BPE ids. This module does the parts they
share — training, the contiguity check, the `special_ids.json` record, reading and copying the
bundled files; the family says which tokens, which split rule and which transformers class.
Deterministic: the same library versions give byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Sequence

SPECIAL_IDS_FILE = "special_ids.json"


def train_byte_level_bpe(corpus: Sequence[str], bpe_vocab_size: int, split_regex: str,
                         byte_level_post_processor: bool = False):
    """A `tokenizers.Tokenizer` with exactly `bpe_vocab_size` learned byte-level BPE tokens.

    NFC normalisation, `split_regex` (isolated) before byte-level mapping; the corpus is repeated
    so pair counts are not all ties, and its order is fixed, so the merges are too."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    if byte_level_post_processor:
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    bpe.train_from_iterator(list(corpus) * 3, trainer=trainer)
    if bpe.get_vocab_size() != bpe_vocab_size:
        raise RuntimeError(f"tiny tokenizer corpus too small: learned {bpe.get_vocab_size()} BPE tokens, "
                           f"need {bpe_vocab_size}")
    return bpe


def add_tokens(bpe, special: Sequence[str], non_special: Sequence[str] = ()) -> None:
    """Append the added tokens (special first, in the given order) right after the BPE ids."""
    from tokenizers import AddedToken

    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if non_special:
        bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in non_special])


def added_token_ids(tok, tokens: Sequence[str], n_bpe: int, vocab_size: int) -> Dict[str, int]:
    """{token: id} of the added tokens, checked to follow the BPE ids contiguously and to fill the vocabulary."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in tokens}
    if ids != {t: n_bpe + i for i, t in enumerate(tokens)} or len(tok) != vocab_size:
        raise RuntimeError(f"tiny tokenizer added tokens are not contiguous: {ids}")
    return ids


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


class BundledTokenizer:
    """A family's bundled tokenizer directory: where it is, its id record, copying it into a checkpoint."""

    def __init__(self, directory: Path, regenerate: str):
        self.directory = Path(directory)
        self.regenerate = regenerate          # the command that rebuilds it, for the error message

    def asset_dir(self) -> Path:
        if not (self.directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"bundled tiny tokenizer missing at {self.directory}; regenerate it with "
                                    f"`{self.regenerate}`")
        return self.directory

    def special_ids(self) -> dict:
        with open(self.asset_dir() / SPECIAL_IDS_FILE, encoding="utf-8") as f:
            return json.load(f)

    def copy_assets(self, dst_dir: str | os.PathLike) -> list:
        """Copy the tokenizer + processor files (not `special_ids.json`) into an HF checkpoint
        directory, as a released checkpoint carries them; returns the copies."""
        dst_dir = Path(dst_dir)
        dst_dir.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(src, dst_dir / src.name)) for src in sorted(self.asset_dir().iterdir())
                if src.is_file() and src.name != SPECIAL_IDS_FILE]

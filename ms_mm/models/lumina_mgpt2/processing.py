"""Lumina-mGPT 2.0 data: the item processor (image crop + prompt template), the feature files that
feature extraction writes, and the training loader over them (length-grouped, resumable).

Host side only (numpy, PIL, the text tokenizer); MoVQGAN runs in `features.py`.

Item processor (upstream FlexARItemProcessor + pre_tokenize.ItemProcessor):
* `generate_crop_size_list((target_size // patch_size) ** 2, patch_size)`: every (w, h) of whole
  `patch_size` grids with at most that many grids and aspect ratio <= 4;
* `var_center_crop`: the crop size whose aspect ratio is closest to the image's, BOX-halving while
  the image is twice as large, a BICUBIC resize to cover, then a centre crop;
* RGBA / LA / P images are blended over white (`whiten_transparency`), pixels to [-1, 1];
* the prompt turn is "Generate an image of {w}x{h} according to the following prompt:\\n{caption}"
  (upstream: 90% of items; the other 10% drop the size: here drawn per item from `(seed, index)`,
  so a resumed extraction writes the same tokens), the image is the answer turn.

Feature file (`files/<id>.npz`, no pickles): `input_ids` / `labels` int32 [S] (the full training
sequence, `inputs.t2i_sequence`), `id`, `layout` int64 [len(LAYOUT_FIELDS)] (the token layout and
vocabulary it was made with), `grid_hw` [2]. The index `data.jsonl` has one `{"file", "len", "id"}`
line per record (upstream pre_tokenize's record), `file` relative to the index's folder.
Loading checks the layout against the model (`FeatureMismatch`: another tokenizer's codebook size,
code offset or special ids) and the length against `max_position_embeddings`.

Training loader: `build_lumina_dataloader(data_cfg, config, ...)` reads the feature data json
(`dataset_type: "lumina"`, `preprocess_parameters.item_processor_type: LoadFeatureItemProcessor`,
`basic_parameters.data_config.path` = the index) and yields model inputs. Sampling is length-grouped
as upstream's FinetuneDistSampler: per epoch the records are shuffled, sorted by length, cut into
global micro batches (micro batch x world size) of neighbouring lengths whose order is shuffled; each
rank takes its slice of each. `dataloader_param.group_by_length: false` falls back to a plain shuffle.
"""
from __future__ import annotations

import json
import os
import random
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ms_mm.data.errors import BadSampleError
from ms_mm.data.loader import MllmDataLoader, padded_length, section
from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config, LuminaTokenConfig
from ms_mm.models.lumina_mgpt2.inputs import IGNORE_INDEX, PAD_ID, build_model_inputs, t2i_sequence

__all__ = ["generate_crop_size_list", "var_center_crop", "whiten_transparency", "image_to_array", "t2i_prompt",
           "item_prompt", "TextTokenizer", "load_text_tokenizer", "token_config_for", "LAYOUT_FIELDS",
           "layout_vector", "write_feature", "read_feature", "FeatureMismatch", "read_index", "LuminaFeatureDataset",
           "length_grouped_shard", "LengthGroupedLoader", "build_lumina_dataloader", "DATASET_TYPE",
           "LOAD_FEATURE_PROCESSOR", "TOKENIZER_PROCESSOR", "INDEX_FILE"]

DATASET_TYPE = "lumina"
LOAD_FEATURE_PROCESSOR = "LoadFeatureItemProcessor"
TOKENIZER_PROCESSOR = "TokenizerItemProcessor"
INDEX_FILE = "data.jsonl"
SIZE_PROMPT_FRACTION = 0.9     # upstream pre_tokenize: `random.random() < 0.9` -> the prompt names the size
LAYOUT_FIELDS = ("vocab_size", "code_offset", "codebook_size", "image_start_id", "image_end_id", "newline_id",
                 "grid_base_id", "separator_id", "patch_size", "downsample")


# ------------------------------------------------------------------------------ item processor

def generate_crop_size_list(num_patches: int, patch_size: int, max_ratio: float = 4.0) -> List[Tuple[int, int]]:
    """(w, h) pairs of whole grids, at most `num_patches` grids, aspect ratio <= max_ratio (upstream order)."""
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    out = []
    wp, hp = num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            out.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return out


def _center_crop(img, crop_size):
    from PIL import Image

    while img.size[0] >= 2 * crop_size[0] and img.size[1] >= 2 * crop_size[1]:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = max(crop_size[0] / img.size[0], crop_size[1] / img.size[1])
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    left = (img.size[0] - crop_size[0]) // 2
    upper = (img.size[1] - crop_size[1]) // 2
    return img.crop((left, upper, left + crop_size[0], upper + crop_size[1]))


def var_center_crop(img, crop_size_list: Sequence[Tuple[int, int]]):
    """The crop of `crop_size_list` that keeps the most of the image (upstream, random_top_k=1)."""
    w, h = img.size
    if (w, h) in crop_size_list:
        return img
    rem = [min(cw / w, ch / h) / max(cw / w, ch / h) for cw, ch in crop_size_list]
    best = sorted(zip(rem, crop_size_list), reverse=True)[0][1]
    return _center_crop(img, best)


def whiten_transparency(img):
    """RGB; an alpha channel is blended over white (upstream `_whiten_transparency`)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    rgba = np.array(img.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return img.convert("RGB")
    alpha = rgba[:, :, 3:4] / 255.0
    rgb = (1 - alpha) * 255 + alpha * rgba[:, :, :3]
    return Image.fromarray(rgb.astype("uint8"), "RGB")


def image_to_array(img) -> np.ndarray:
    """PIL RGB -> float32 [3, H, W] in [-1, 1] (MoVQGAN's input)."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return np.ascontiguousarray((arr * 2 - 1).transpose(2, 0, 1))


def t2i_prompt(caption: str, width: Optional[int], height: Optional[int]) -> str:
    """The human turn of a text-to-image sample (upstream pre_tokenize's two templates)."""
    if width is None or height is None:
        return f"Generate an image according to the following prompt:\n{caption}"
    return f"Generate an image of {width}x{height} according to the following prompt:\n{caption}"


def item_prompt(caption: str, width: int, height: int, seed: int, index: int) -> str:
    """Upstream's 90 / 10 choice of template, drawn from (seed, index): the same on every run."""
    with_size = random.Random(f"{seed}:{index}").random() < SIZE_PROMPT_FRACTION
    return t2i_prompt(caption, width, height) if with_size else t2i_prompt(caption, None, None)


class TextTokenizer:
    """The checkpoint's text tokenizer (transformers' fast tokenizer from `tokenizer.json`) and its
    whole vocabulary (added tokens included) by name."""

    def __init__(self, directory: str | os.PathLike):
        from transformers import PreTrainedTokenizerFast

        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer_config.from_pretrained {self.directory}: no tokenizer.json there")
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        self.vocab = dict(self.tokenizer.get_vocab())

    def encode(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def fingerprint(self) -> int:
        return len(self.vocab)


def load_text_tokenizer(directory) -> TextTokenizer:
    return TextTokenizer(directory)


def token_config_for(tokenizer: TextTokenizer, patch_size: int = 32, downsample: int = 8) -> LuminaTokenConfig:
    """The image-token layout of a tokenizer's vocabulary (ids by their released names)."""
    vocab = tokenizer.vocab
    missing = [t for t in ("<racm3:break>", "<eoss>", "<reserved08799>", "<reserved08800>", "<MOVQGAN0>",
                           "<reserved08706>") if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer {tokenizer.directory}: lacks the image-layout token(s) {missing} "
                         f"(not a Lumina-mGPT 2.0 tokenizer)")
    tokens = LuminaTokenConfig.from_vocabulary_map(vocab, patch_size=int(patch_size), downsample=int(downsample))
    codes = sorted(v for k, v in vocab.items() if k.startswith("<MOVQGAN"))
    if codes != list(range(tokens.code_offset, tokens.code_offset + len(codes))):
        raise ValueError(f"tokenizer {tokenizer.directory}: the <MOVQGAN*> ids are not contiguous from "
                         f"{tokens.code_offset}")
    return tokens


# ------------------------------------------------------------------------------ feature files

def layout_vector(tokens: LuminaTokenConfig, vocab_size: int) -> np.ndarray:
    values = dict(vars(tokens), vocab_size=int(vocab_size))
    return np.asarray([int(values[f]) for f in LAYOUT_FIELDS], np.int64)


def write_feature(path: str | os.PathLike, input_ids: Sequence[int], labels: Sequence[int], record_id: int,
                  layout: np.ndarray, grid_hw: Tuple[int, int]) -> None:
    """Write one feature file atomically (a temp file renamed into place: never half a record)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, input_ids=np.asarray(input_ids, np.int32), labels=np.asarray(labels, np.int32),
                 id=np.asarray(record_id, np.int64), layout=np.asarray(layout, np.int64),
                 grid_hw=np.asarray(grid_hw, np.int64))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FeatureMismatch(BadSampleError):
    """A feature file made with another tokenizer / image layout than the model's."""


def read_feature(path: str | os.PathLike, expect_layout: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Load a feature file; a truncated / unreadable file or a layout mismatch is a BadSampleError
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BadSampleError("feature file not found", str(path))
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: np.asarray(z[k]) for k in ("input_ids", "labels", "id", "layout", "grid_hw")}
    except KeyError as e:
        raise BadSampleError(f"not a Lumina feature file (no {e.args[0]!r} array)", str(path)) from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise BadSampleError(f"truncated or corrupt feature file ({type(e).__name__}: {e})", str(path)) from None
    if out["input_ids"].shape != out["labels"].shape or out["input_ids"].ndim != 1:
        raise BadSampleError(f"input_ids {list(out['input_ids'].shape)} and labels {list(out['labels'].shape)} "
                             f"do not match", str(path))
    if expect_layout is not None:
        got = out["layout"]
        if got.shape != expect_layout.shape:
            raise FeatureMismatch(f"layout record has {got.size} fields, expected {expect_layout.size}", str(path))
        diff = [f"{f} {int(a)} (model: {int(b)})" for f, a, b in zip(LAYOUT_FIELDS, got, expect_layout) if a != b]
        if diff:
            raise FeatureMismatch("made with another tokenizer / image tokenizer: " + ", ".join(diff)
                                  + "; re-run feature extraction with this model's tokenizer", str(path))
    return out


def read_index(index_path: str | os.PathLike) -> List[dict]:
    """data.jsonl -> records with `file` resolved against the index's folder (errors name the line)."""
    index_path = Path(index_path)
    if not index_path.is_file():
        raise FileNotFoundError(f"feature index {index_path} not found (run feature extraction first: "
                                f"bash examples/mindspore/lumina/mgpt2/feature_extract/feature_extraction.sh)")
    records = []
    with open(index_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                file, length = rec["file"], int(rec["len"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{index_path}:{n}: not a feature record ({type(e).__name__}: {e})") from None
            p = Path(file)
            records.append({"file": str(p if p.is_absolute() else index_path.parent / p), "len": length,
                            "id": rec.get("id", n - 1), "where": f"{index_path}:{n}"})
    if not records:
        raise ValueError(f"feature index {index_path} has no records")
    return records


class LuminaFeatureDataset:
    """`dataset[i]` -> {"input_ids", "labels"} of record i, checked against the model."""

    def __init__(self, index_path, config: LuminaMGPT2Config):
        self.index_path = Path(index_path)
        self.records = read_index(index_path)
        self.lengths = np.asarray([r["len"] for r in self.records], np.int64)
        self.max_len = int(config.max_position_embeddings)
        self.layout = layout_vector(config.tokens, config.vocab_size)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        out = read_feature(rec["file"], self.layout)
        n = int(out["input_ids"].size)
        if n > self.max_len:
            raise BadSampleError(f"{n} tokens, more than the model's context max_position_embeddings={self.max_len} "
                                 f"(a shorter prompt or a smaller target_size fits)", rec["file"])
        if not (out["labels"] != IGNORE_INDEX).any():
            raise BadSampleError("no target tokens (every label is -100)", rec["file"])
        return {"input_ids": out["input_ids"], "labels": out["labels"]}


# ------------------------------------------------------------------------------ training loader

def length_grouped_shard(lengths: Sequence[int], epoch: int, seed: int, rank: int, world_size: int,
                         micro_batch_size: int, shuffle: bool = True) -> np.ndarray:
    """Record indices rank `rank` reads in epoch `epoch` (len(lengths) // world_size of them):
    shuffled, sorted by length (stable), cut into global micro batches of micro_batch_size x
    world_size neighbours, their order shuffled; rank r takes slice r of each."""
    lengths = np.asarray(lengths)
    n = (len(lengths) // world_size) * world_size
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    order = order[:n]
    order = order[np.argsort(lengths[order], kind="stable")]
    step = micro_batch_size * world_size
    chunks = [order[i:i + step] for i in range(0, n, step)]
    if shuffle:
        chunks = [chunks[j] for j in rng.permutation(len(chunks))]
    per = [len(c) // world_size for c in chunks]
    return np.concatenate([c[rank * k:(rank + 1) * k] for c, k in zip(chunks, per)]) if chunks \
        else np.zeros(0, np.int64)


class LengthGroupedLoader(MllmDataLoader):
    """`MllmDataLoader` whose per-epoch order (`epoch_order`) is `length_grouped_shard` while
    `group_by_length` is on (same positions, state and bad-sample handling)."""

    def __init__(self, dataset, *args, lengths=None, group_by_length: bool = True, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.lengths = np.asarray(lengths if lengths is not None else dataset.lengths)
        self.group_by_length = group_by_length

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.group_by_length:
            return super().epoch_order(epoch)
        return length_grouped_shard(self.lengths, epoch, self.seed, self.rank, self.world_size,
                                    self.micro_batch_size, self.shuffle)


def _collate(samples, max_len: int, pad_to, pad_multiple) -> dict:
    length = padded_length([len(s["input_ids"]) for s in samples], pad_to, pad_multiple)
    length = min(length, max_len)
    ids = np.full((len(samples), length), PAD_ID, np.int64)
    lab = np.full((len(samples), length), IGNORE_INDEX, np.int64)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = s["input_ids"]
        lab[i, :n] = s["labels"]
    return {"input_ids": ids, "labels": lab}


def build_lumina_dataloader(data_cfg: dict, config: LuminaMGPT2Config, micro_batch_size: int = 1, seed: int = 1234,
                            rank: int = 0, world_size: int = 1, num_workers: Optional[int] = None,
                            skip_bad_samples: bool = False, num_epochs: Optional[int] = None,
                            model_inputs_fn=None, worker_type: Optional[str] = None) -> LengthGroupedLoader:
    """The training loader of a Lumina feature data json (see the module docstring).
    `dataloader_param`: `shuffle`, `drop_last`, `num_workers`, `group_by_length` (true), `pad_to`
    ("longest" or an int), `pad_multiple` (16: fewer distinct shapes for the graph-mode step)."""
    dp = section(data_cfg, "dataset_param")
    pp = dp.get("preprocess_parameters") or {}
    kind = pp.get("item_processor_type", LOAD_FEATURE_PROCESSOR)
    if kind != LOAD_FEATURE_PROCESSOR:
        raise ValueError(f"dataset_param.preprocess_parameters.item_processor_type is {kind!r}: training reads "
                         f"extracted features ({LOAD_FEATURE_PROCESSOR!r}); {TOKENIZER_PROCESSOR!r} is the "
                         f"feature-extraction json (feature_extract/data.json)")
    basic = section(dp, "basic_parameters", "dataset_param.")
    data_config = basic.get("data_config") or {}
    path = data_config.get("path") if isinstance(data_config, dict) else None
    if not path:
        raise KeyError("data config: dataset_param.basic_parameters.data_config.path (the features' data.jsonl) "
                       "is required")
    dataset = LuminaFeatureDataset(path, config)
    dl = data_cfg.get("dataloader_param") or {}
    pad_to = dl.get("pad_to", "longest")
    pad_multiple = dl.get("pad_multiple", 16)
    padded_length([1], pad_to, pad_multiple)   # validate now, not in the producer thread
    max_len = int(config.max_position_embeddings)
    inputs_fn = model_inputs_fn if model_inputs_fn is not None else (lambda b: build_model_inputs(b, config))
    return LengthGroupedLoader(
        dataset, micro_batch_size, lambda s: _collate(s, max_len, pad_to, pad_multiple),
        lengths=dataset.lengths, group_by_length=bool(dl.get("group_by_length", True)),
        seed=seed, rank=rank, world_size=world_size, shuffle=bool(dl.get("shuffle", True)),
        drop_last=bool(dl.get("drop_last", True)),
        num_workers=num_workers if num_workers is not None else int(dl.get("num_workers", 2)),
        prefetch_batches=int(dl.get("prefetch_batches", 4)), skip_bad_samples=skip_bad_samples,
        num_epochs=num_epochs, model_inputs_fn=inputs_fn, worker_type=worker_type or dl.get("worker_type", "thread"))

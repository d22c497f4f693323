"""DeepSeek-VL2 data pipeline: processor, jsonl dataset, collate and the training loader.

`DeepseekVL2DataProcessor(processor_dir)` turns one conversation + its images into the arrays the
upstream `DeepseekVLV2Processor` (deepseek-ai/DeepSeek-VL2, training mode: `inference_mode=False`)
produces, bit for bit: `input_ids`, `labels` (upstream `target_ids`), `attention_mask`, `images`
[tiles, 3, T, T], `images_seq_mask`, `images_spatial_crop` [images, 2] = (w_tiles, h_tiles).
What it reproduces, in the order upstream applies it:

- Tokens: one BOS opens the sample (its label is BOS itself; the shift never reads it). A user
  turn is formatted with the 'deepseek' conversation template as the prompt of that single turn,
  `"<|User|>: {content}\\n\\n<|Assistant|>:"`, cut at each `<image>` tag, and every piece is
  encoded on its own (no special tokens added); user turns (and a leading system message) are
  masked with -100. An assistant turn is its stripped content + EOS, all supervised. Image tokens
  are -100 in the labels whatever the masking.
- Tiles (dynamic tiling): the candidate resolution keeping most of the image after an
  aspect-preserving resize wins (ties: least padding, first listed). The global view is the
  image `ImageOps.pad`-ed to one tile, the local view the image padded to the chosen resolution
  and cut into tiles row by row. The padding colour is `int(255 * image_mean)` (127 for the
  released 0.5 means). With more than two images in a sample nothing is cropped (1x1 local).
  Pixels: x / 255, then (x - mean) / std in float32 (torchvision ToTensor + Normalize).
- Token layout (tile_tag "2D", global view first): h = w = ceil((T // patch) / downsample);
  global h x (w + 1), one view separator, local (th * h) x (tw * w + 1), all `<image>` ids.

A sample without images carries one zero tile and spatial crop (0, 0), as upstream.

The dataset reads the jsonl that `examples/deepseekvl2/convert_ai2d_to_dsvl.py` writes (MindSpeed-MM's
DeepSeek-VL2 format): `{"id": ..., "conversations": [{"role": "<|User|>", "content":
"<image>\\n...", "images": ["rel/path.png"]}, {"role": "<|Assistant|>", "content": "..."}]}`;
image paths are joined to `data_folder`. The images of all turns, in order, fill the `<image>`
tags in order; a record-level `"images"` list is accepted instead. `build_deepseek_vl2_dataloader`
reads a MindSpeed-MM `data.json` (`dataset_type: "deepseekvl2"`, `basic_parameters.data_path`,
`data_folder`, `processor_path`) and runs the shared `MllmDataLoader` (seeded order, rank
sharding, background workers, resume state, bad-sample skipping).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ms_mm.data.errors import BadSampleError
from ms_mm.data.images import load_image
from ms_mm.data.loader import (IGNORE_INDEX, MllmDataLoader, buckets_from_config, load_data_config, loader_from_config,
                               padded_length)
from ms_mm.data.mllm_dataset import _BadRecord, read_records
from ms_mm.models.deepseek_vl2.inputs import select_best_resolution  # numpy only: one copy of the rule

__all__ = [
    "DeepseekVL2DataProcessor", "DeepseekVL2Dataset", "select_best_resolution", "tile_image",
    "collate_deepseek_vl2",
    "build_deepseek_vl2_processor", "build_deepseek_vl2_dataset", "build_deepseek_vl2_dataloader",
    "USER_ROLE", "ASSISTANT_ROLE", "IMAGE_TOKEN",
]

USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<｜▁pad▁｜>"
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
# 'deepseek' conversation template: separator after a user turn, after an assistant turn.
USER_SEP = "\n\n"
ASSISTANT_SEP = "<｜end▁of▁sentence｜>"

_USER_ROLES = (USER_ROLE, "user", "User")
_ASSISTANT_ROLES = (ASSISTANT_ROLE, "assistant", "Assistant")
_SYSTEM_ROLES = ("system", "deepseekapi-sys")

PROCESSOR_CONFIG = "processor_config.json"


def _normalised_half(img) -> np.ndarray:
    """x / 255, then (x - 0.5) / 0.5, channels first: the released processor's normalisation."""
    x = np.asarray(img.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return ((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)


def tile_image(image, tile_size: int, candidate_resolutions, *, cropping: bool = True,
               fill=(127, 127, 127), to_array: Callable = _normalised_half):
    """PIL image → ([global view, local tiles row-major] as float32 [3, T, T] arrays, (w_tiles, h_tiles)).

    The global view is the image padded to one tile; the local view is the image padded to the best
    candidate resolution (`ms_mm.models.deepseek_vl2.select_best_resolution`) and cut into tiles.
    Defaults are the released processor's (fill 127, mean = std = 0.5)."""
    from PIL import ImageOps

    t = int(tile_size)
    best_w, best_h = select_best_resolution(image.size, candidate_resolutions) if cropping else (t, t)
    tiles = [to_array(ImageOps.pad(image, (t, t), color=fill))]
    local = ImageOps.pad(image, (best_w, best_h), color=fill)
    for y in range(0, best_h, t):
        for x in range(0, best_w, t):
            tiles.append(to_array(local.crop((x, y, x + t, y + t))))
    return tiles, (best_w // t, best_h // t)


class DeepseekVL2DataProcessor:
    """One conversation + images → the upstream processor's arrays (see the module docstring).

    `processor_dir` holds the tokenizer files and `processor_config.json` (an HF DeepSeek-VL2
    checkpoint directory, or `ms_mm/models/deepseek_vl2/assets`). `max_length` (optional)
    truncates longer samples at the end, unless that would cut into an image (a bad sample).
    `mask_prompt` / `inference_mode` override the config / default (training: EOS kept)."""

    def __init__(self, processor_dir: str | os.PathLike, max_length: int | None = None,
                 mask_prompt: bool | None = None, inference_mode: bool = False):
        from transformers import LlamaTokenizerFast

        processor_dir = Path(processor_dir)
        cfg_path = processor_dir / PROCESSOR_CONFIG
        if not cfg_path.is_file():
            raise FileNotFoundError(f"DeepSeek-VL2 processor: {cfg_path} not found (processor_path must be an "
                                    "HF DeepSeek-VL2 checkpoint directory with tokenizer + processor_config.json)")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: malformed json at line {e.lineno} column {e.colno}: {e.msg}") from None
        self.config = cfg
        self.candidate_resolutions = [tuple(int(v) for v in r) for r in _required(cfg, "candidate_resolutions", cfg_path)]
        if not self.candidate_resolutions or any(len(r) != 2 for r in self.candidate_resolutions):
            raise ValueError(f"{cfg_path}: candidate_resolutions must be a non-empty list of [width, height]")
        self.image_size = self.candidate_resolutions[0][0]  # the tile side, as upstream
        for r in self.candidate_resolutions:
            if r[0] % self.image_size or r[1] % self.image_size or min(r) <= 0:
                raise ValueError(f"{cfg_path}: candidate resolution {list(r)} is not a multiple of the tile "
                                 f"size {self.image_size} (the first candidate's width)")
        self.patch_size = int(_required(cfg, "patch_size", cfg_path))
        self.downsample_ratio = int(_required(cfg, "downsample_ratio", cfg_path))
        self.image_mean = tuple(float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5)))
        self.image_std = tuple(float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5)))
        self.normalize = bool(cfg.get("normalize", True))
        self.image_token = cfg.get("image_token", IMAGE_TOKEN)
        self.sft_format = cfg.get("sft_format", "deepseek")
        if self.sft_format != "deepseek":
            raise ValueError(f"{cfg_path}: sft_format {self.sft_format!r} is not supported (only 'deepseek', "
                             "the format of the released checkpoints)")
        self.mask_prompt = bool(cfg.get("mask_prompt", True)) if mask_prompt is None else bool(mask_prompt)
        self.ignore_id = int(cfg.get("ignore_id", IGNORE_INDEX))
        self.inference_mode = bool(inference_mode)
        self.cutoff_len = int(max_length) if max_length else None  # the name the shared loader uses

        try:
            tok = LlamaTokenizerFast.from_pretrained(str(processor_dir))
        except Exception as e:  # noqa: BLE001 - name the directory whatever the tokenizer says
            raise ValueError(f"DeepSeek-VL2 processor: cannot load the tokenizer from {processor_dir}: {e}") from e
        # The upstream processor adds these tokens when the tokenizer lacks them, in this order.
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": cfg.get("pad_token", PAD_TOKEN)})
        for group in ([self.image_token], list(GROUNDING_TOKENS), [USER_ROLE, ASSISTANT_ROLE]):
            missing = [t for t in group if t not in tok.get_vocab()]
            if missing:
                tok.add_special_tokens({"additional_special_tokens": missing},
                                       replace_additional_special_tokens=False)
        self.tokenizer = tok
        vocab = tok.get_vocab()
        self.image_token_id = vocab[self.image_token]
        self.bos_token_id, self.eos_token_id, self.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        if self.bos_token_id is None or self.eos_token_id is None:
            raise ValueError(f"DeepSeek-VL2 processor: the tokenizer in {processor_dir} has no bos/eos token")
        self._fill = tuple(int(m * 255) for m in self.image_mean)
        self._mean = np.asarray(self.image_mean, np.float32)[:, None, None]
        self._std = np.asarray(self.image_std, np.float32)[:, None, None]

    # ------------------------------------------------------------------ tokens
    @property
    def tokens_per_tile_side(self) -> int:
        return math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)

    def num_image_tokens(self, num_width_tiles: int, num_height_tiles: int) -> int:
        side = self.tokens_per_tile_side
        return side * (side + 1) + 1 + (num_height_tiles * side) * (num_width_tiles * side + 1)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    # ------------------------------------------------------------------ images
    def _to_array(self, img) -> np.ndarray:
        x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        x = x.transpose(2, 0, 1)
        if self.normalize:
            x = (x - self._mean) / self._std
        return x

    def tile_image(self, image, cropping: bool = True) -> tuple[list[np.ndarray], tuple[int, int]]:
        """RGB PIL image → ([global tile, local tiles row-major], (w_tiles, h_tiles))."""
        return tile_image(image, self.image_size, self.candidate_resolutions, cropping=cropping,
                          fill=self._fill, to_array=self._to_array)

    def _text_with_images(self, text: str, images: list, cropping: bool):
        """Tokens of `text` with every `<image>` tag expanded into its image tokens."""
        pieces = text.split(self.image_token)
        ids, seq_mask, tiles, crops = [], [], [], []
        for piece, image in zip(pieces, images):
            piece_ids = self.encode(piece)
            ids += piece_ids
            seq_mask += [False] * len(piece_ids)
            image_tiles, (tw, th) = self.tile_image(image, cropping)
            tiles += image_tiles
            crops.append((tw, th))
            n = self.num_image_tokens(tw, th)
            ids += [self.image_token_id] * n
            seq_mask += [True] * n
        last = self.encode(pieces[-1])
        return ids + last, seq_mask + [False] * len(last), tiles, crops

    # ------------------------------------------------------------------ samples
    def __call__(self, conversations: Sequence[dict], images: Sequence = (), system_prompt: str = "") -> dict:
        """`conversations`: [{"role": "<|User|>" | "user" | "<|Assistant|>" | "assistant" |
        "system", "content": str}, ...]; `images`: paths or PIL images filling the `<image>`
        tags of the user turns in order. Returns unbatched numpy arrays (see module docstring).
        `system_prompt` is accepted for upstream's signature; like upstream it changes no token
        (a system *message* first in `conversations` is encoded, masked)."""
        if not conversations:
            raise BadSampleError("the conversation has no messages")
        n_tags = 0
        for i, m in enumerate(conversations):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise BadSampleError(f"message {i} needs a 'role' and a string 'content'")
            tags = m["content"].count(self.image_token)
            if tags and m["role"] not in _USER_ROLES:
                raise BadSampleError(f"message {i} ({m['role']}) has {self.image_token} tags; images belong on "
                                     "user turns")
            n_tags += tags
        if n_tags != len(images):
            raise BadSampleError(f"the conversation has {n_tags} {self.image_token} tag(s) but {len(images)} "
                                 "image(s) are given")
        pil_images = [load_image(im) for im in images]
        cropping = len(pil_images) <= 2

        ids, labels, seq_mask = [self.bos_token_id], [self.bos_token_id], [False]
        tiles, crops, used = [], [], 0
        for i, m in enumerate(conversations):
            role, content = m["role"], m["content"].strip()
            if role in _USER_ROLES:
                user = f"{USER_ROLE}: {content}{USER_SEP}" if content else f"{USER_ROLE}:"
                prompt = user + f"{ASSISTANT_ROLE}:"
                k = prompt.count(self.image_token)
                turn_ids, turn_mask, turn_tiles, turn_crops = self._text_with_images(
                    prompt, pil_images[used:used + k], cropping)
                used += k
                ids += turn_ids
                labels += [self.ignore_id] * len(turn_ids) if self.mask_prompt else turn_ids
                seq_mask += turn_mask
                tiles += turn_tiles
                crops += turn_crops
            elif role in _ASSISTANT_ROLES:
                turn_ids = self.encode(content) + [self.eos_token_id]
                ids += turn_ids
                labels += turn_ids
                seq_mask += [False] * len(turn_ids)
            elif role in _SYSTEM_ROLES:
                if i != 0:
                    raise BadSampleError(f"message {i}: a system message may only open the conversation")
                turn_ids = self.encode(content)
                ids += turn_ids
                labels += [self.ignore_id] * len(turn_ids) if self.mask_prompt else turn_ids
                seq_mask += [False] * len(turn_ids)
            else:
                raise BadSampleError(f"message {i}: unknown role {role!r} (expected {USER_ROLE}, "
                                     f"{ASSISTANT_ROLE}, user, assistant or system)")

        input_ids = np.asarray(ids, np.int64)
        labels = np.asarray(labels, np.int64)
        seq_mask = np.asarray(seq_mask, bool)
        labels[input_ids == self.image_token_id] = self.ignore_id
        if self.inference_mode:
            if input_ids[-1] != self.eos_token_id:
                raise BadSampleError("inference mode needs a conversation that ends with an assistant turn")
            input_ids, labels, seq_mask = input_ids[:-1], labels[:-1], seq_mask[:-1]
        if self.cutoff_len is not None and len(input_ids) > self.cutoff_len:
            if seq_mask[self.cutoff_len:].any():
                raise BadSampleError(f"sample has {len(input_ids)} tokens; cutting it to max_length="
                                     f"{self.cutoff_len} would cut an image")
            input_ids, labels, seq_mask = (a[:self.cutoff_len] for a in (input_ids, labels, seq_mask))
        if not self.inference_mode and not (labels[1:] != self.ignore_id).any():
            raise BadSampleError("nothing to supervise: no assistant tokens"
                                 + (f" within max_length={self.cutoff_len}" if self.cutoff_len else ""))
        if tiles:
            images_arr = np.stack(tiles).astype(np.float32)
            crop_arr = np.asarray(crops, np.int64).reshape(-1, 2)
        else:
            images_arr = np.zeros((1, 3, self.image_size, self.image_size), np.float32)
            crop_arr = np.zeros((1, 2), np.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": np.ones(len(input_ids), np.int64),
            "labels": labels,
            "images": images_arr,
            "images_seq_mask": seq_mask,
            "images_spatial_crop": crop_arr,
        }


def _required(cfg: dict, key: str, path) -> object:
    if key not in cfg:
        raise KeyError(f"{path}: required key {key!r} is missing")
    return cfg[key]


# ---------------------------------------------------------------------- collate
def collate_deepseek_vl2(samples: Sequence[dict], pad_token_id: int, pad_to=None,
                         pad_multiple: int | None = None) -> dict[str, np.ndarray]:
    """Processor dicts → the upstream batch layout (right padding, for training):
    `input_ids` (pad id) / `attention_mask` (0) / `labels` (-100) / `images_seq_mask` (False)
    [B, S]; `images` [B, max_tiles, 3, T, T] zero-padded; `images_spatial_crop` [B, max_images, 2]
    zero-padded ((0, 0) ends a sample's images)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    length = padded_length([len(s["input_ids"]) for s in samples], pad_to, pad_multiple)
    b = len(samples)
    batch = {
        "input_ids": np.full((b, length), pad_token_id, np.int64),
        "attention_mask": np.zeros((b, length), np.int64),
        "labels": np.full((b, length), IGNORE_INDEX, np.int64),
        "images_seq_mask": np.zeros((b, length), bool),
    }
    for i, s in enumerate(samples):
        for key in batch:
            batch[key][i, :len(s[key])] = s[key]
    max_tiles = max(s["images"].shape[0] for s in samples)
    max_images = max(s["images_spatial_crop"].shape[0] for s in samples)
    images = np.zeros((b, max_tiles) + samples[0]["images"].shape[1:], np.float32)
    crops = np.zeros((b, max_images, 2), np.int64)
    for i, s in enumerate(samples):
        images[i, :s["images"].shape[0]] = s["images"]
        crops[i, :s["images_spatial_crop"].shape[0]] = s["images_spatial_crop"]
    batch["images"] = images
    batch["images_spatial_crop"] = crops
    return batch


# ---------------------------------------------------------------------- dataset
class DeepseekVL2Dataset:
    """Indexable DeepSeek-VL2 jsonl / json dataset: `ds[i]` → the processor dict of record i.

    Records are read up front (a malformed line is kept and reported as a bad sample, with its
    file and line, when the loader reaches it). `repeat_time` < 1 keeps that fraction of the
    records, > 1 repeats them (a fractional part adds a prefix), as MindSpeed-MM's `repeat_time`."""

    def __init__(self, files: Sequence[str | os.PathLike], processor: DeepseekVL2DataProcessor,
                 data_folder: str | os.PathLike | None = None, repeat_time: float = 1.0,
                 max_samples: int | None = None):
        self.processor = processor
        self.records: list[tuple[str, object, Path]] = []
        for f in files:
            self.records += [(where, rec, Path(data_folder) if data_folder is not None else Path(f).parent)
                             for where, rec in read_records(f)]
        n = len(self.records)
        if repeat_time <= 0:
            raise ValueError(f"repeat_time must be > 0, got {repeat_time}")
        whole, frac = int(repeat_time), repeat_time - int(repeat_time)
        self.records = self.records * whole + self.records[:int(n * frac)]
        if max_samples is not None:
            self.records = self.records[:int(max_samples)]
        if not self.records:
            raise ValueError("DeepSeek-VL2 dataset is empty: " + ", ".join(str(f) for f in files))

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        return self.records[index][0]

    def __getitem__(self, index: int) -> dict:
        where, record, folder = self.records[index]
        try:
            conversations, images = parse_record(record, folder)
            return self.processor(conversations, images)
        except BadSampleError as e:
            raise e.located(where) from None


def parse_record(record, data_folder: Path) -> tuple[list[dict], list[str]]:
    """A DeepSeek-VL2 jsonl record → (messages, image paths under `data_folder`)."""
    if isinstance(record, _BadRecord):
        raise BadSampleError(record.reason)
    if not isinstance(record, dict):
        raise BadSampleError(f"record is a {type(record).__name__}, expected an object")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSampleError("record needs a non-empty 'conversations' list")
    messages, images = [], []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise BadSampleError(f"conversations[{i}] needs a 'role' and a string 'content'")
        messages.append({"role": m["role"], "content": m["content"]})
        images += _image_list(m.get("images"), f"conversations[{i}].images")
    top = _image_list(record.get("images"), "images")
    if top and images:
        raise BadSampleError("images are given both per message and at record level; use one")
    images = images or top
    return messages, [os.path.join(data_folder, p) for p in images]


def _image_list(value, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadSampleError(f"{key} must be a list of image paths, got {value!r}")
    return value


# ---------------------------------------------------------------------- data.json
def _dataset_param(data_cfg: dict) -> dict:
    dp = data_cfg.get("dataset_param")
    if not isinstance(dp, dict):
        raise KeyError("data config: dataset_param (an object) is required")
    return dp


def build_deepseek_vl2_processor(data_cfg: dict, max_length: int | None = None) -> DeepseekVL2DataProcessor:
    """The processor a DeepSeek-VL2 `data.json` dict names (`dataset_param.processor_path`)."""
    dp = _dataset_param(data_cfg)
    path = dp.get("processor_path")
    if not path:
        raise KeyError("data config: dataset_param.processor_path is required (the HF DeepSeek-VL2 checkpoint "
                       "directory with the tokenizer and processor_config.json)")
    if max_length is None:
        max_length = dp.get("max_length")
    return DeepseekVL2DataProcessor(path, max_length=max_length)


def build_deepseek_vl2_dataset(data_cfg: dict, processor: DeepseekVL2DataProcessor | None = None):
    """The dataset a DeepSeek-VL2 `data.json` dict describes; `basic_parameters` may be one
    object or a list of them (their records are concatenated, each with its own data_folder)."""
    dp = _dataset_param(data_cfg)
    processor = processor or build_deepseek_vl2_processor(data_cfg)
    basics = dp.get("basic_parameters")
    if isinstance(basics, dict):
        basics = [basics]
    if not isinstance(basics, list) or not basics:
        raise KeyError("data config: dataset_param.basic_parameters (an object or a list) is required")
    parts = []
    for i, basic in enumerate(basics):
        where = "dataset_param.basic_parameters" + (f"[{i}]" if len(basics) > 1 else "")
        if not isinstance(basic, dict) or not basic.get("data_path"):
            raise KeyError(f"data config: {where}.data_path is required")
        path = Path(basic["data_path"])
        if not path.is_file():
            raise FileNotFoundError(f"data config: {where}.data_path {str(path)!r} not found")
        folder = basic.get("data_folder")
        if folder is not None and not Path(folder).is_dir():
            raise FileNotFoundError(f"data config: {where}.data_folder {folder!r} is not a directory")
        parts.append(DeepseekVL2Dataset([path], processor, folder, float(basic.get("repeat_time", 1))))
    if len(parts) == 1:
        ds = parts[0]
    else:
        ds = parts[0]
        for p in parts[1:]:
            ds.records += p.records
    max_samples = dp.get("max_samples")
    if max_samples is not None:
        ds.records = ds.records[:int(max_samples)]
    return ds


def build_deepseek_vl2_dataloader(data_cfg, model_config=None, micro_batch_size: int = 1, seed: int = 1234,
                                  rank: int = 0, world_size: int = 1, num_workers: int | None = None,
                                  skip_bad_samples: bool = False, *, model_inputs_fn: Callable | None = None,
                                  num_epochs: int | None = None, worker_type: str | None = None,
                                  max_length: int | None = None) -> MllmDataLoader:
    """The DeepSeek-VL2 training loader for a MindSpeed-MM `data.json` (dict or path).

    Same contract as `ms_mm.data.build_dataloader`: batches go through
    `ms_mm.models.deepseek_vl2.inputs.build_model_inputs(batch, model_config)` when
    `model_config` is given (or `model_inputs_fn`), else they are the collated processor batches.
    `dataloader_param`: `shuffle`, `drop_last`, `num_workers`, `prefetch_batches`, `worker_type`,
    `pad_to` ("buckets" (default: the smallest of `seq_buckets` — a list, or "auto", the
    `ms_mm.data.loader.Buckets` ladder capped at max_length — holding the longest sample) | "longest" |
    "max_length" | int), `pad_multiple`, `tile_buckets` (a list, "auto" (default: the ladder in
    steps of 4 tiles) or null: pad the batch's image tiles to a few counts), `group_by_length` (also
    `dataset_param.group_by_length`); `collate_param.pad_id` is checked
    against the tokenizer's pad id (the tokenizer's wins). `max_length` (argument, else
    `dataset_param.max_length`) is the per-sample token budget (the training seq_length)."""
    if isinstance(data_cfg, (str, os.PathLike)):
        data_cfg = load_data_config(data_cfg)
    dl = data_cfg.get("dataloader_param", {}) or {}
    processor = build_deepseek_vl2_processor(data_cfg, max_length)
    dataset = build_deepseek_vl2_dataset(data_cfg, processor)
    pad_to = dl.get("pad_to", "buckets")
    if pad_to in ("max_length", "cutoff_len"):
        if processor.cutoff_len is None:
            raise ValueError(f"dataloader_param.pad_to is {pad_to!r} but no max_length is set")
        pad_to = processor.cutoff_len
    elif pad_to == "buckets":
        pad_to = buckets_from_config(dl.get("seq_buckets", "auto"), processor.cutoff_len, multiple=64)
    tile_setting = dl.get("tile_buckets", "auto")
    tile_buckets = None if tile_setting is None else buckets_from_config(tile_setting, None, 4)
    pad_multiple = dl.get("pad_multiple")
    padded_length([1], pad_to, pad_multiple)  # validate now, not in the producer thread
    pad_id = processor.pad_token_id
    cfg_pad = (dl.get("collate_param") or {}).get("pad_id")
    if cfg_pad is not None and int(cfg_pad) != pad_id:
        import logging

        logging.getLogger(__name__).warning(
            "dataloader_param.collate_param.pad_id=%s differs from the tokenizer's pad id %s; using %s",
            cfg_pad, pad_id, pad_id)

    def collate_fn(samples):
        return collate_deepseek_vl2(samples, pad_id, pad_to, pad_multiple)

    if model_inputs_fn is None and model_config is not None:
        from ms_mm.models.deepseek_vl2.inputs import build_model_inputs

        def model_inputs_fn(batch):
            return build_model_inputs(batch, model_config, tile_buckets)

    group = bool(_dataset_param(data_cfg).get("group_by_length", False))
    return loader_from_config(dl, dataset, micro_batch_size, collate_fn, seed=seed, rank=rank, world_size=world_size,
                              num_workers=num_workers, skip_bad_samples=skip_bad_samples, num_epochs=num_epochs,
                              model_inputs_fn=model_inputs_fn, worker_type=worker_type, group_by_length=group)

"""Qwen2-VL sample processor: one conversation + its images → token ids, labels, image patches.

What it reproduces (checked against `../shared/fixtures/qwen2_5_vl/processor`, which was made by
transformers 4.57.1's `Qwen2_5_VLProcessor` with the slow image processor):
- images: transformers' slow `Qwen2VLImageProcessor` (PIL bicubic `smart_resize` into
  [min_pixels, max_pixels], rescale, CLIP normalisation, 2x2-merge-ordered patches);
- text: the `qwen2vl` chat template (`<|im_start|>{role}\\n{content}<|im_end|>\\n`, default
  system prompt "You are a helpful assistant."), each image as `<|vision_start|>` +
  `<|image_pad|>` x (t*h*w / merge_size²) + `<|vision_end|>`, tokenized in one pass by the
  checkpoint's own fast tokenizer (no trust_remote_code);
- labels: the token ids of every assistant reply (its content and `<|im_end|>`), -100 on the
  system and user turns, on the `<|im_start|>assistant\\n` header and on the `\\n` after
  `<|im_end|>` (LLaMA-Factory's supervised rule with train_on_prompt / mask_history off).

Content may be a string with `<image>` placeholders (MindSpeed-MM `mllm_format`) or a list of
typed parts (`{"type": "image"}` / `{"type": "text", "text": ...}`, the HF chat format). The
template is rendered here in Python rather than through jinja so that each reply's character
span is known; labels then come from the tokenizer's offsets, so tokenization is exactly the
one-pass tokenization of the full text.

Videos are not supported yet (a `<video>` placeholder is a bad sample).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ms_mm.data.errors import BadSampleError
from ms_mm.data.images import ImageLike, load_image
from ms_mm.data.loader import (IGNORE_INDEX, MllmDataLoader, buckets_from_config, collate, load_data_config,
                               loader_from_config, padded_length, section as _section)

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
TEMPLATES = ("qwen2vl", "qwen2_vl")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
# Literal vision tokens in user text would be expanded like real images and break the count.
_RESERVED_IN_TEXT = (VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>", "<|vision_pad|>")

class Qwen2VLDataProcessor:
    """Turns `(messages, images)` into the unbatched processor dict:

    `input_ids [S]`, `attention_mask [S]`, `labels [S]` (int64), `pixel_values [N, C*2*14*14]`
    (float32), `image_grid_thw [I, 3]` (int64).

    `processor_dir` holds the tokenizer files and `preprocessor_config.json` (an HF Qwen2-VL /
    Qwen2.5-VL checkpoint dir, or `ms_mm.models.qwen2_5_vl.tokenizer.asset_dir()`). `min_pixels` /
    `max_pixels` override the image processor's pixel budget (data json `image_min_pixels` /
    `image_max_pixels`); None keeps the checkpoint's value.
    """

    def __init__(self, processor_dir: str | os.PathLike, min_pixels: int | None = None,
                 max_pixels: int | None = None, *, template: str = "qwen2vl",
                 cutoff_len: int | None = None, train_on_prompt: bool = False,
                 mask_history: bool = False, default_system: str = DEFAULT_SYSTEM):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        if template not in TEMPLATES:
            raise ValueError(f"template {template!r} is not supported; use one of {TEMPLATES}")
        processor_dir = Path(processor_dir)
        for name in ("preprocessor_config.json", "tokenizer_config.json"):
            if not (processor_dir / name).is_file():
                raise FileNotFoundError(f"{processor_dir / name} not found: processor_dir must hold the "
                                        "checkpoint's tokenizer and preprocessor files")
        self.tokenizer = AutoTokenizer.from_pretrained(str(processor_dir), use_fast=True,
                                                       trust_remote_code=False)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{processor_dir}: a fast tokenizer (tokenizer.json) is required")
        self.image_processor = Qwen2VLImageProcessor.from_pretrained(str(processor_dir))
        ip = self.image_processor
        self.min_pixels = int(min_pixels) if min_pixels is not None else int(ip.min_pixels)
        self.max_pixels = int(max_pixels) if max_pixels is not None else int(ip.max_pixels)
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"image_min_pixels {self.min_pixels} > image_max_pixels {self.max_pixels}")
        self.merge_size = int(ip.merge_size)
        self.patch_dim = 3 * int(ip.temporal_patch_size) * int(ip.patch_size) ** 2
        self.cutoff_len = cutoff_len
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        self.default_system = default_system

        self.token_ids = {}
        for tok in (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise ValueError(f"{processor_dir}: tokenizer has no {tok} token (not a Qwen2-VL tokenizer?)")
            self.token_ids[tok] = tid
        self.image_token_id = self.token_ids[IMAGE_PAD]
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    # ---------------------------------------------------------------- images
    def process_images(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """Images → (`pixel_values [N, patch_dim]` float32, `image_grid_thw [I, 3]` int64)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        if not images:
            return np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        pil = [load_image(im) for im in images]
        factor = self.image_processor.patch_size * self.merge_size
        for src, im in zip(images, pil):
            name = src if not hasattr(src, "size") else "<PIL image>"
            try:
                h, w = smart_resize(im.height, im.width, factor, self.min_pixels, self.max_pixels)
            except ValueError as e:
                raise BadSampleError(f"image {name} ({im.width}x{im.height}): {e}") from None
            if h < factor or w < factor:
                raise BadSampleError(f"image {name} ({im.width}x{im.height}) is too small for "
                                     f"min_pixels={self.min_pixels}")
        out = self.image_processor(images=pil, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                                   return_tensors="np")
        return (np.asarray(out["pixel_values"], dtype=np.float32),
                np.asarray(out["image_grid_thw"], dtype=np.int64))

    # ------------------------------------------------------------------ text
    def _content_parts(self, content, role: str) -> list:
        """Content → list of text strings and `None` (an image slot), in order."""
        if isinstance(content, str):
            if VIDEO_PLACEHOLDER in content:
                raise BadSampleError("videos (<video>) are not supported by this pipeline yet")
            for tok in _RESERVED_IN_TEXT:
                if tok in content:
                    raise BadSampleError(f"{role} text contains the literal token {tok}; "
                                         f"use {IMAGE_PLACEHOLDER} for images")
            pieces = content.split(IMAGE_PLACEHOLDER)
            parts = [pieces[0]]
            for p in pieces[1:]:
                parts += [None, p]
            return [p for p in parts if p != ""]
        if isinstance(content, list):
            parts = []
            for item in content:
                if not isinstance(item, dict):
                    raise BadSampleError(f"{role} content item is not an object: {item!r}")
                kind = item.get("type")
                if kind == "image" or "image" in item or "image_url" in item:
                    parts.append(None)
                elif kind == "video" or "video" in item:
                    raise BadSampleError("videos are not supported by this pipeline yet")
                elif "text" in item:
                    parts += self._content_parts(str(item["text"]), role)
            return parts
        raise BadSampleError(f"{role} content must be a string or a list, got {type(content).__name__}")

    def _segments(self, messages: Sequence[dict], system: str | None) -> tuple[list, int]:
        """Render the qwen2vl template into `(piece, supervised)` segments, where a piece is a
        string or `None` (an image slot, expanded once the grid sizes are known)."""
        if not messages:
            raise BadSampleError("empty conversation")
        msgs = list(messages)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise BadSampleError(f"message {i} is a {type(m).__name__}, expected an object")
        if msgs[0].get("role") == "system":
            system = msgs[0].get("content")
            msgs = msgs[1:]
        if system is None:
            system = self.default_system
        if not isinstance(system, str):
            raise BadSampleError("system prompt must be a string")
        assistant_turns = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
        if not assistant_turns:
            raise BadSampleError("conversation has no assistant turn to learn from")
        last_assistant = assistant_turns[-1]

        prompt = self.train_on_prompt
        segs = [(f"{IM_START}system\n", prompt)] + [(p, prompt) for p in self._content_parts(system, "system")]
        segs.append((f"{IM_END}\n", prompt))
        for i, m in enumerate(msgs):
            role = m.get("role")
            if role not in ("user", "assistant"):
                raise BadSampleError(f"message {i}: role must be user or assistant, got {role!r}")
            if "content" not in m:
                raise BadSampleError(f"message {i} ({role}) has no content")
            parts = self._content_parts(m["content"], role)
            if role == "assistant":
                if None in parts:
                    raise BadSampleError(f"message {i}: images in an assistant reply are not supported")
                learn = not self.mask_history or i == last_assistant
                segs.append((f"{IM_START}assistant\n", prompt))
                segs += [(p, learn) for p in parts]
                segs.append((IM_END, learn))
                segs.append(("\n", prompt))
            else:
                segs.append((f"{IM_START}user\n", prompt))
                segs += [(p, prompt) for p in parts]
                segs.append((f"{IM_END}\n", prompt))
        n_images = sum(1 for p, _ in segs if p is None)
        return segs, n_images

    # ------------------------------------------------------------------ main
    def __call__(self, messages: Sequence[dict], images: Sequence[ImageLike] = (),
                 system: str | None = None) -> dict[str, np.ndarray]:
        segs, n_slots = self._segments(messages, system)
        if n_slots != len(images):
            raise BadSampleError(f"{n_slots} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
        pixel_values, grid_thw = self.process_images(images)
        tokens_per_image = [int(np.prod(g)) // self.merge_size ** 2 for g in grid_thw]

        # Concatenate the text, remembering the character spans that carry labels.
        text, spans, k = [], [], 0
        pos = 0
        for piece, supervised in segs:
            if piece is None:
                piece = VISION_START + IMAGE_PAD * tokens_per_image[k] + VISION_END
                k += 1
            if supervised and piece:
                if spans and spans[-1][1] == pos:
                    spans[-1][1] = pos + len(piece)
                else:
                    spans.append([pos, pos + len(piece)])
            text.append(piece)
            pos += len(piece)
        text = "".join(text)

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = np.asarray(enc["input_ids"], dtype=np.int64)
        starts = np.asarray([o[0] for o in enc["offset_mapping"]], dtype=np.int64)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        for a, b in spans:
            sel = (starts >= a) & (starts < b)
            labels[sel] = input_ids[sel]
        if int((input_ids == self.image_token_id).sum()) != sum(tokens_per_image):
            raise BadSampleError("image token count after tokenization does not match the image grids "
                                 "(does the text contain <|image_pad|>?)")

        if self.cutoff_len is not None and len(input_ids) > self.cutoff_len:
            vision = np.nonzero((input_ids == self.image_token_id)
                                | (input_ids == self.token_ids[VISION_END]))[0]
            if len(vision) and vision[-1] >= self.cutoff_len:
                raise BadSampleError(f"sample has {len(input_ids)} tokens; cutting it to cutoff_len="
                                     f"{self.cutoff_len} would cut through an image")
            input_ids, labels = input_ids[:self.cutoff_len], labels[:self.cutoff_len]
        if not (labels != IGNORE_INDEX).any():
            raise BadSampleError("no assistant tokens left to learn from (cutoff_len too small?)")
        return {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids),
            "labels": labels,
            "pixel_values": pixel_values,
            "image_grid_thw": grid_thw,
        }


# ------------------------------------------------------------------ data json -> loader
def _default_model_inputs_fn(model_config, patch_buckets=None):
    from ms_mm.models.qwen2_5_vl.inputs import build_model_inputs

    return lambda batch: build_model_inputs(batch, model_config, patch_buckets)


def build_processor(data_cfg: dict):
    """The `Qwen2VLDataProcessor` a `data_*.json` dict describes."""
    dp = _section(data_cfg, "dataset_param")
    pre = _section(dp, "preprocess_parameters", "dataset_param.")
    basic = _section(dp, "basic_parameters", "dataset_param.")
    if "model_name_or_path" not in pre:
        raise KeyError("data config: dataset_param.preprocess_parameters.model_name_or_path is required")
    return Qwen2VLDataProcessor(
        pre["model_name_or_path"], pre.get("image_min_pixels"), pre.get("image_max_pixels"),
        template=basic.get("template", "qwen2vl"), cutoff_len=basic.get("cutoff_len", 1024),
        train_on_prompt=bool(basic.get("train_on_prompt", False)),
        mask_history=bool(basic.get("mask_history", False)))


def build_dataset(data_cfg: dict, processor=None):
    """The `MllmDataset` a `data_*.json` dict describes."""
    from ms_mm.data.mllm_dataset import MllmDataset, resolve_dataset_files

    dp = _section(data_cfg, "dataset_param")
    basic = _section(dp, "basic_parameters", "dataset_param.")
    if "dataset" not in basic:
        raise KeyError("data config: dataset_param.basic_parameters.dataset is required")
    dataset_dir = basic.get("dataset_dir")
    files = resolve_dataset_files(basic["dataset"], dataset_dir)
    return MllmDataset(files, processor or build_processor(data_cfg), dataset_dir=dataset_dir,
                       attr=dp.get("attr"), max_samples=basic.get("max_samples"))


def build_dataloader(data_cfg: dict, model_config=None, micro_batch_size: int = 1, seed: int = 1234,
                     rank: int = 0, world_size: int = 1, num_workers: int | None = None,
                     skip_bad_samples: bool = False, *, model_inputs_fn: Callable | None = None,
                     num_epochs: int | None = None, worker_type: str | None = None) -> MllmDataLoader:
    """The training loader for a Qwen2.5-VL `data_*.json` dict (MindSpeed-MM layout, mllm_format data).

    Batches go through `ms_mm.models.qwen2_5_vl.inputs.build_model_inputs(batch, model_config)`
    when `model_config` is given (or through `model_inputs_fn` if given); with neither they are
    the plain processor batches. `dataloader_param` supplies `shuffle` (default true),
    `drop_last` (true), `num_workers` (2; the argument wins when not None), `prefetch_batches`
    (4), `worker_type` ("thread" or "process"; the argument wins), `group_by_length` (also
    `dataset_param.group_by_length`), and the padding policy: `pad_to` = "buckets" (default: the
    smallest of `seq_buckets` — a list of lengths, or "auto", the `ms_mm.data.loader.Buckets` ladder
    capped at cutoff_len — that holds the longest sample), "longest", "cutoff_len" or an int, and
    `pad_multiple` (rounding). Image patches are padded to `patch_buckets` (a list, "auto" (default:
    the ladder in steps of 64 patches) or null for no padding), so the train step sees a few
    static shapes. `data_cfg` may also be the path of the json file."""
    if isinstance(data_cfg, (str, os.PathLike)):
        data_cfg = load_data_config(data_cfg)
    dl = data_cfg.get("dataloader_param", {}) or {}
    dataset = build_dataset(data_cfg)
    processor = dataset.processor
    pad_to = dl.get("pad_to", "buckets")
    if pad_to == "cutoff_len":
        if processor.cutoff_len is None:
            raise ValueError("dataloader_param.pad_to is 'cutoff_len' but no cutoff_len is set")
        pad_to = processor.cutoff_len
    elif pad_to == "buckets":
        pad_to = buckets_from_config(dl.get("seq_buckets", "auto"), processor.cutoff_len, multiple=64)
    patch_setting = dl.get("patch_buckets", "auto")
    merge_unit = processor.merge_size ** 2
    patch_buckets = None if patch_setting is None else buckets_from_config(patch_setting, None, 16 * merge_unit)
    if patch_buckets is not None and any(e % merge_unit for e in patch_buckets.edges):
        raise ValueError(f"dataloader_param.patch_buckets {list(patch_buckets.edges)}: every edge must be a "
                         f"multiple of {merge_unit} (2x2 patch merging)")
    pad_multiple = dl.get("pad_multiple")
    pad_id = processor.pad_token_id
    padded_length([1], pad_to, pad_multiple)  # validate now, not in the producer thread

    def collate_fn(samples):
        return collate(samples, pad_id, pad_to, pad_multiple)

    if model_inputs_fn is None and model_config is not None:
        model_inputs_fn = _default_model_inputs_fn(model_config, patch_buckets)
    group = bool((data_cfg.get("dataset_param") or {}).get("group_by_length", False))
    return loader_from_config(dl, dataset, micro_batch_size, collate_fn, seed=seed, rank=rank, world_size=world_size,
                              num_workers=num_workers, skip_bad_samples=skip_bad_samples, num_epochs=num_epochs,
                              model_inputs_fn=model_inputs_fn, worker_type=worker_type, group_by_length=group)

"""Host-side (numpy only) input preparation for DeepSeek-VL2.

Everything data-dependent lives here so the Cell compiles with static shapes in graph mode:
which tiles are real (the processor pads ``images`` per sample), the dynamic tiling grid chosen
from ``candidate_resolutions``, where each image token takes its embedding from (tile token,
``image_newline`` or ``view_seperator``), positions and the causal/padding attention bias.

Token layout of one image (tile_tag "2D", grid h = w = ceil((image_size/patch)/downsample)):
global view h rows of (w tokens + newline), one view separator, then the local tiles stitched
into (th*h) rows of (tw*w tokens + newline); ``global_view_pos: tail`` swaps global and local.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from .config import DeepseekVL2Config

# Order of the tensors ``DeepseekVL2ForCausalLM.construct`` takes.
MODEL_INPUT_NAMES = ("input_ids", "position_ids", "attention_bias", "pixel_values",
                     "image_token_index", "images_seq_mask", "labels")

__all__ = ["MODEL_INPUT_NAMES", "select_best_resolution", "tile_grid", "num_image_tokens",
           "image_token_rows", "build_model_inputs"]


def select_best_resolution(image_size: Tuple[int, int], candidate_resolutions) -> Tuple[int, int]:
    """(width, height) of the candidate that keeps the most of the image after an aspect-preserving
    resize, ties broken by the least padding (upstream processor rule, first best wins). The one
    copy of the rule: the data pipeline's tiling (`ms_mm.models.deepseek_vl2.processing`) uses it too."""
    width, height = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_w, cand_h in candidate_resolutions:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cand_w), int(cand_h)), effective, wasted
    return best


def tile_grid(image_size: Tuple[int, int], config: DeepseekVL2Config, cropping: bool = True) -> Tuple[int, int]:
    """(num_width_tiles, num_height_tiles) for an image of (width, height) pixels."""
    tile = config.vision_config.image_size
    if not cropping:
        return 1, 1
    w, h = select_best_resolution(image_size, config.candidate_resolutions)
    return w // tile, h // tile


def num_image_tokens(num_width_tiles: int, num_height_tiles: int, config: DeepseekVL2Config) -> int:
    side = config.tokens_per_tile_side
    return side * (side + 1) + 1 + (num_height_tiles * side) * (num_width_tiles * side + 1)


def image_token_rows(num_width_tiles: int, num_height_tiles: int, first_tile: int, num_tiles_total: int,
                     config: DeepseekVL2Config) -> np.ndarray:
    """Row indices into the gather table [all tile tokens (tile-major); newline; separator] for the
    tokens of one image whose global tile is ``first_tile`` (local tiles follow row-major)."""
    side = config.tokens_per_tile_side
    hw = side * side
    newline = num_tiles_total * hw
    separator = newline + 1
    rows = np.arange(side)[:, None]
    cols = np.arange(side)[None, :]
    glob = first_tile * hw + rows * side + cols  # [h, w]
    glob = np.concatenate([glob, np.full((side, 1), newline)], 1).reshape(-1)
    th, tw = num_height_tiles, num_width_tiles
    # local grid [(th h), (tw w)]: tile (i, j) at row-major index i*tw + j after the global tile
    r = np.arange(th * side)[:, None]
    c = np.arange(tw * side)[None, :]
    tile_idx = first_tile + 1 + (r // side) * tw + (c // side)
    local = tile_idx * hw + (r % side) * side + (c % side)
    local = np.concatenate([local, np.full((th * side, 1), newline)], 1).reshape(-1)
    if config.global_view_pos == "head":
        parts = [glob, [separator], local]
    else:
        parts = [local, [separator], glob]
    return np.concatenate([np.asarray(p, np.int64) for p in parts])


def build_model_inputs(batch: Dict[str, np.ndarray], config: DeepseekVL2Config, tile_buckets=None) -> Dict[str, np.ndarray]:
    """Processor batch -> the model's inputs, keys in ``MODEL_INPUT_NAMES`` order.

    ``batch``: ``input_ids [B, S]``, ``attention_mask [B, S]`` (optional, default all ones),
    ``labels [B, S]`` (optional, default all -100), ``images [B, max_tiles, 3, T, T]``,
    ``images_seq_mask [B, S]`` bool, ``images_spatial_crop [B, max_images, 2]`` (w_tiles, h_tiles;
    (0, 0) ends a sample's images) - the ``DeepseekVLV2Processor`` batch layout. The three image
    keys may be left out together for a text-only batch.

    ``tile_buckets`` (an object with ``size(n)``, e.g. ``ms_mm.data.loader.Buckets``): the tile count
    is padded up to its bucket with zero tiles that no token reads (tiles are encoded independently,
    so loss and gradients are unchanged); the result then also holds ``"_padding": {"tiles": (real,
    padded)}`` (for the loader's log; not a model input).
    """
    if "input_ids" not in batch:
        raise KeyError(f"build_model_inputs: batch has no 'input_ids' (got {sorted(batch)})")
    input_ids = np.asarray(batch["input_ids"])
    if input_ids.ndim != 2:
        raise ValueError(f"build_model_inputs: input_ids must be [B, S], got shape {input_ids.shape}")
    b, s = input_ids.shape
    tile = config.vision_config.image_size
    image_keys = ("images", "images_seq_mask", "images_spatial_crop")
    given = [k for k in image_keys if k in batch]
    if not given:  # a text-only batch
        batch = dict(batch, images=np.zeros((b, 1, 3, tile, tile), np.float32),
                     images_seq_mask=np.zeros((b, s), bool), images_spatial_crop=np.zeros((b, 1, 2), np.int64))
    elif len(given) != len(image_keys):
        missing = [k for k in image_keys if k not in batch]
        raise KeyError(f"build_model_inputs: batch has {given} but no {missing}: the image keys go together")
    attention_mask = np.asarray(batch.get("attention_mask", np.ones((b, s))), bool)
    labels = np.asarray(batch["labels"]) if batch.get("labels") is not None else np.full((b, s), -100)
    seq_mask = np.asarray(batch["images_seq_mask"], bool)
    images = np.asarray(batch["images"], np.float32)
    crops = np.asarray(batch["images_spatial_crop"]).reshape(b, -1, 2)
    for key, arr, shape in (("attention_mask", attention_mask, (b, s)), ("labels", labels, (b, s)),
                            ("images_seq_mask", seq_mask, (b, s))):
        if arr.shape != shape:
            raise ValueError(f"build_model_inputs: {key} has shape {arr.shape}, expected {shape}")
    if images.ndim != 5 or images.shape[0] != b or images.shape[2:] != (3, tile, tile):
        raise ValueError(f"build_model_inputs: images has shape {images.shape}, expected "
                         f"[{b}, max_tiles, 3, {tile}, {tile}]")

    # which tiles are real, and each image's (w, h) tiles, sample by sample
    per_sample: List[List[Tuple[int, int]]] = []
    tiles = []
    for i in range(b):
        grids = []
        n_tiles = 0
        for w_t, h_t in crops[i]:
            if w_t == 0 or h_t == 0:
                break
            grids.append((int(w_t), int(h_t)))
            n_tiles += 1 + int(w_t) * int(h_t)
        if n_tiles > images.shape[1]:
            raise ValueError(f"build_model_inputs: sample {i} needs {n_tiles} tiles by images_spatial_crop "
                             f"but images holds {images.shape[1]}")
        tiles.append(images[i, :n_tiles])
        per_sample.append(grids)
    total_tiles = sum(t.shape[0] for t in tiles)
    if total_tiles == 0:
        # text-only batch: one blank tile keeps the graph identical; no token reads it
        pixel_values = np.zeros((1, 3, tile, tile), np.float32)
        total_tiles = 1
    else:
        pixel_values = np.concatenate(tiles, 0)
    real_tiles = sum(t.shape[0] for t in tiles)
    if tile_buckets is not None:
        target = int(tile_buckets.size(total_tiles))
        if target > total_tiles:
            pixel_values = np.concatenate([pixel_values, np.zeros((target - total_tiles, 3, tile, tile), np.float32)])
            total_tiles = target

    index = np.zeros((b, s), np.int32)
    first = 0
    for i in range(b):
        rows = []
        for w_t, h_t in per_sample[i]:
            rows.append(image_token_rows(w_t, h_t, first, total_tiles, config))
            first += 1 + w_t * h_t
        rows = np.concatenate(rows) if rows else np.zeros((0,), np.int64)
        n_mask = int(seq_mask[i].sum())
        if n_mask != rows.size:
            raise ValueError(f"build_model_inputs: sample {i} has {n_mask} positions in images_seq_mask but "
                             f"its images_spatial_crop {per_sample[i]} implies {rows.size} image tokens")
        index[i, seq_mask[i]] = rows

    causal = np.tril(np.ones((s, s), bool))
    allowed = causal[None] & attention_mask[:, None, :]  # [B, S(q), S(k)]
    attention_bias = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]

    out = {
        "input_ids": input_ids.astype(np.int32),
        "position_ids": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
        "attention_bias": attention_bias,
        "pixel_values": pixel_values.astype(np.float32),
        "image_token_index": index,
        "images_seq_mask": seq_mask,
        "labels": labels.astype(np.int32),
    }
    out = {k: out[k] for k in MODEL_INPUT_NAMES}
    if tile_buckets is not None:
        out["_padding"] = {"tiles": (real_tiles, total_tiles)}
    return out


def as_dp_slice(inputs: dict, dp_rank: int, dp: int, config: DeepseekVL2Config) -> dict:
    """One data-parallel rank's inputs (built from its own samples) as its slice of the global batch.
    Every input holds the samples (or tiles) along axis 0, the family's default sample axis.

    The compiled graph sees the ``dp`` ranks' inputs concatenated (tiles too, every rank's of the same
    count), so ``image_token_index`` must point into the global gather table [tile tokens of every rank's
    tiles; newline; separator]: a tile token of rank k moves past the ``k`` ranks before it, the newline
    and separator rows to the end of the global table."""
    if dp == 1:
        return inputs
    hw = config.tokens_per_tile_side ** 2
    tile_tokens = int(np.shape(inputs["pixel_values"])[0]) * hw
    index = np.asarray(inputs["image_token_index"])
    glob = np.where(index < tile_tokens, index + dp_rank * tile_tokens, index + (dp - 1) * tile_tokens)
    # positions that are no image token keep their (unread) 0, as the combined batch's would
    glob = np.where(np.asarray(inputs["images_seq_mask"], bool), glob, index)
    return dict(inputs, image_token_index=glob.astype(index.dtype))

"""Host-side (numpy) preparation of Qwen2.5-VL model inputs.

Everything that depends on the data rather than on the weights is computed here, once per
batch, so the MindSpore Cell sees fixed-rank tensors and compiles in graph mode:

* 3-D M-RoPE position ids and rope deltas (upstream ``get_rope_index``, images only);
* the vision tower's 2-D rotary ids, its window permutation and the segment ids that define
  window attention (per window) and full attention (per image frame);
* where each image embedding goes in the flattened token sequence.

Attention masks are passed as segment ids ([N] ints) instead of dense [N, N] masks: the Cell
expands them, which keeps host memory and transfer linear in the number of patches.
"""
from __future__ import annotations

import numpy as np

MODEL_INPUT_NAMES = (
    "input_ids",             # [B, S] int32
    "attention_mask",        # [B, S] int32, 1 = real token
    "position_ids",          # [3, B, S] int32, M-RoPE (t, h, w)
    "labels",                # [B, S] int32, -100 = not supervised (unshifted; the model shifts)
    "pixel_values",          # [N, C*T*P*P] float32, patches in 2x2-merge raster order
    "image_gather_index",    # [B, S] int32: row of concat(token_embeds [B*S], image_embeds) for each slot
    "vision_pos_ids",        # [N, 2] int32: (h, w) rotary ids, already in window order
    "vision_window_index",   # [N] int32: patch permutation raster-merge order -> window order
    "vision_reverse_index",  # [N / merge_unit] int32: merged tokens back to raster-merge order
    "vision_window_seg",     # [N] int32: window id of each (window-ordered) patch; [windows, N/windows]
                             #   when every window has the same size (attention then runs per window)
    "vision_frame_seg",      # [N] int32: image-frame id of each (window-ordered) patch; [frames, N/frames]
                             #   likewise
)

# the image encoder's own inputs, in its construct order
VISION_INPUT_NAMES = ("pixel_values", "vision_pos_ids", "vision_window_index", "vision_reverse_index",
                      "vision_window_seg", "vision_frame_seg")

IGNORE_INDEX = -100


def get_rope_index(input_ids, attention_mask, image_grid_thw, config):
    """3-D position ids ``[3, B, S]`` and ``rope_deltas [B, 1]`` (int64) as upstream computes them.

    Text tokens advance all three axes together; the ``t*h*w/merge^2`` tokens of an image get
    (t, h, w) grid coordinates offset by the text before them; padding positions hold 1.
    """
    input_ids = np.asarray(input_ids)
    batch, seq = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask) == 1
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    merge = config.vision.spatial_merge_size
    position_ids = np.ones((3, batch, seq), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    image_index = 0
    for b in range(batch):
        tokens = input_ids[b][mask[b]]
        starts = np.flatnonzero(tokens[:-1] == config.vision_start_token_id)
        following = tokens[starts + 1]
        if np.any(following == config.video_token_id):
            raise ValueError(f"input_ids row {b}: video tokens are not supported (only images)")
        n_images = int(np.sum(following == config.image_token_id))
        pieces, cursor, next_pos = [], 0, 0
        for _ in range(n_images):
            if image_index >= len(grids):
                raise ValueError(f"input_ids row {b} has more images than image_grid_thw rows ({len(grids)})")
            start = int(np.flatnonzero(tokens[cursor:] == config.image_token_id)[0]) + cursor
            t, h, w = (int(v) for v in grids[image_index])
            image_index += 1
            gh, gw = h // merge, w // merge
            text_len = start - cursor
            pieces.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
            # upstream scales the temporal axis by tokens_per_second * seconds_per_grid, and
            # seconds_per_grid is 0 for images: every frame of an image sits at t = 0
            grid = np.stack([
                np.zeros(t * gh * gw, np.int64),
                np.tile(np.repeat(np.arange(gh), gw), t),
                np.tile(np.arange(gw), t * gh),
            ])
            pieces.append(grid + text_len + next_pos)
            next_pos = int(pieces[-1].max()) + 1
            cursor = start + t * gh * gw
            if not np.all(tokens[start:cursor] == config.image_token_id) or cursor > len(tokens):
                run = int(np.argmin(np.append(tokens[start:] == config.image_token_id, False)))
                raise ValueError(f"input_ids row {b}: image {image_index - 1} has {run} <|image_pad|> tokens "
                                 f"but image_grid_thw {[t, h, w]} needs {t * gh * gw}")
        if cursor < len(tokens):
            text_len = len(tokens) - cursor
            pieces.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
        positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        position_ids[:, b, mask[b]] = positions
        deltas[b, 0] = (int(positions.max()) + 1 if positions.size else 0) - seq
    if image_index != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but input_ids reference {image_index} images")
    return position_ids, deltas


def vision_layout(image_grid_thw, config):
    """Rotary ids, window permutation and attention segments of the vision tower (numpy, int64).

    Returns a dict with ``pos_ids [N, 2]`` (window order), ``window_index [N]`` (patch level),
    ``reverse_index [N/unit]``, ``window_seg [N]`` and ``frame_seg [N]``.
    """
    vc = config.vision
    merge, unit = vc.spatial_merge_size, vc.merge_unit
    win = vc.window_size // merge // vc.patch_size  # window side in merged units
    pos_ids, merged_index, window_sizes, frame_sizes = [], [], [], []
    offset = 0
    for i, (t, h, w) in enumerate(np.asarray(image_grid_thw, np.int64).tolist()):
        if t <= 0 or h <= 0 or w <= 0 or h % merge or w % merge:
            raise ValueError(f"image_grid_thw[{i}]={[t, h, w]}: h and w must be positive multiples of "
                             f"spatial_merge_size={merge}")
        # (h, w) of each patch, enumerated in 2x2-merge raster order like the processor's rows
        hh = np.arange(h)[:, None].repeat(w, 1).reshape(h // merge, merge, w // merge, merge)
        ww = np.arange(w)[None, :].repeat(h, 0).reshape(h // merge, merge, w // merge, merge)
        hw = np.stack([hh.transpose(0, 2, 1, 3).ravel(), ww.transpose(0, 2, 1, 3).ravel()], -1)
        pos_ids.append(np.tile(hw, (t, 1)))
        # windows of win x win merged units, padded at the bottom/right edge
        gh, gw = h // merge, w // merge
        nh, nw = gh // win + 1, gw // win + 1  # upstream always pads by (win - g % win), even when 0
        grid = np.full((t, nh * win, nw * win), -1, np.int64)
        grid[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        windows = grid.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        for frame in windows:
            for cells in frame:
                cells = cells[cells >= 0]
                if cells.size:
                    merged_index.append(cells + offset)
                    window_sizes.append(cells.size * unit)
        frame_sizes.extend([gh * gw * unit] * t)
        offset += t * gh * gw
    merged_index = np.concatenate(merged_index) if merged_index else np.zeros(0, np.int64)
    window_index = (merged_index[:, None] * unit + np.arange(unit)).ravel()
    pos_ids = np.concatenate(pos_ids)[window_index] if pos_ids else np.zeros((0, 2), np.int64)
    return {
        "pos_ids": pos_ids,
        "window_index": window_index,
        "reverse_index": np.argsort(merged_index, kind="stable"),
        "window_seg": np.repeat(np.arange(len(window_sizes)), window_sizes),
        "frame_seg": np.repeat(np.arange(len(frame_sizes)), frame_sizes),
    }


def _uniform_segments(segments: np.ndarray) -> np.ndarray:
    """[N] consecutive segment ids -> [G, N/G] when all G segments have one size (the model then attends
    per segment, a batch of G sequences, instead of over all N patches with a mask); else unchanged."""
    sizes = np.bincount(segments)
    if sizes.size > 1 and np.all(sizes == sizes[0]):
        return segments.reshape(sizes.size, sizes[0])
    return segments


def build_model_inputs(batch: dict, config, patch_buckets=None) -> dict:
    """Processor batch (numpy) -> the model's inputs, keyed and ordered by ``MODEL_INPUT_NAMES``.

    ``batch``: ``input_ids [B,S]``, ``attention_mask [B,S]`` (optional), ``labels [B,S]``
    (optional), ``pixel_values [N, C*T*P*P]`` and ``image_grid_thw [I, 3]`` (absent for text-only
    batches: a 2x2-patch blank image no token reads keeps the graph signature fixed).

    ``patch_buckets`` (an object with ``size(n)``, e.g. ``ms_mm.data.loader.Buckets``): the patch
    count is padded up to its bucket with one blank image of grid (1, 2, pad/2) placed after the
    real ones. It is its own attention window and frame, and no token reads its embeddings, so
    loss and gradients are those of the unpadded batch. The result then also holds
    ``"_padding": {"patches": (real, padded)}`` (for the loader's log; not a model input).
    """
    if "input_ids" not in batch:
        raise ValueError("build_model_inputs: batch has no 'input_ids'")
    input_ids = np.asarray(batch["input_ids"])
    if input_ids.ndim != 2:
        raise ValueError(f"build_model_inputs: input_ids must be [B, S], got shape {input_ids.shape}")
    bsz, seq = input_ids.shape
    attention_mask = batch.get("attention_mask")
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    labels = batch.get("labels")
    labels = np.full_like(input_ids, IGNORE_INDEX) if labels is None else np.asarray(labels)
    for name, arr in (("attention_mask", attention_mask), ("labels", labels)):
        if arr.shape != input_ids.shape:
            raise ValueError(f"build_model_inputs: {name} has shape {arr.shape}, input_ids has {input_ids.shape}")
    vocab = config.text.vocab_size
    if input_ids.min() < 0 or input_ids.max() >= vocab:
        raise ValueError(f"build_model_inputs: input_ids outside [0, {vocab}) (min {input_ids.min()}, "
                         f"max {input_ids.max()})")

    vc = config.vision
    grid = batch.get("image_grid_thw")
    pixels = batch.get("pixel_values")
    if grid is None or len(grid) == 0:
        if pixels is not None and len(pixels):
            raise ValueError("build_model_inputs: pixel_values given without image_grid_thw")
        rope_grid = None
        grid = np.array([[1, vc.spatial_merge_size, vc.spatial_merge_size]], np.int64)
        pixels = np.zeros((vc.merge_unit, vc.patch_dim), np.float32)
    else:
        grid = np.asarray(grid, np.int64)
        rope_grid = grid
        if pixels is None:
            raise ValueError("build_model_inputs: image_grid_thw given without pixel_values")
        pixels = np.asarray(pixels, np.float32)
        n_patches = int(np.prod(grid, axis=1).sum())
        if pixels.shape != (n_patches, vc.patch_dim):
            raise ValueError(f"build_model_inputs: pixel_values has shape {pixels.shape}, expected "
                             f"({n_patches}, {vc.patch_dim}) from image_grid_thw")

    position_ids, _ = get_rope_index(input_ids, attention_mask, rope_grid, config)

    is_image = (input_ids == config.image_token_id).ravel()
    n_image_tokens = int(is_image.sum())
    n_embeds = int(np.prod(grid, axis=1).sum()) // vc.merge_unit if rope_grid is not None else 0
    if n_image_tokens != n_embeds:
        raise ValueError(f"build_model_inputs: {n_image_tokens} <|image_pad|> tokens (id {config.image_token_id}) "
                         f"but image_grid_thw yields {n_embeds} image embeddings")
    gather = np.arange(bsz * seq)
    gather[is_image] = bsz * seq + np.arange(n_image_tokens)

    padding = None
    if patch_buckets is not None:
        real = int(pixels.shape[0])
        target = int(patch_buckets.size(real))
        extra = target - real
        if extra % vc.merge_unit:
            raise ValueError(f"build_model_inputs: patch bucket {target} is not a multiple of merge_unit "
                             f"{vc.merge_unit} away from {real} patches")
        if extra:
            merge = vc.spatial_merge_size
            grid = np.concatenate([grid, np.array([[1, merge, extra // merge]], np.int64)])
            pixels = np.concatenate([pixels, np.zeros((extra, vc.patch_dim), np.float32)])
        padding = {"patches": (n_embeds * vc.merge_unit, target)}

    layout = vision_layout(grid, config)
    i32 = np.int32
    out = {
        "input_ids": input_ids.astype(i32),
        "attention_mask": attention_mask.astype(i32),
        "position_ids": position_ids.astype(i32),
        "labels": labels.astype(i32),
        "pixel_values": pixels,
        "image_gather_index": gather.reshape(bsz, seq).astype(i32),
        "vision_pos_ids": layout["pos_ids"].astype(i32),
        "vision_window_index": layout["window_index"].astype(i32),
        "vision_reverse_index": layout["reverse_index"].astype(i32),
        "vision_window_seg": _uniform_segments(layout["window_seg"]).astype(i32),
        "vision_frame_seg": _uniform_segments(layout["frame_seg"]).astype(i32),
    }
    if padding is not None:
        out["_padding"] = padding
    return out


# the axis along which each input holds the batch's samples (rows, patches, ...): fed per data-parallel rank,
# the global batch is the ranks' inputs concatenated along it (``as_dp_slice``)
SAMPLE_AXES = {"position_ids": 1}


def as_dp_slice(inputs: dict, dp_rank: int, dp: int) -> dict:
    """One data-parallel rank's inputs (built from its own samples) as its slice of the global batch.

    Under per-rank data the compiled graph sees the ``dp`` ranks' inputs concatenated along their sample
    axes (every rank's of the same shapes), so the indices into them must be global: ``image_gather_index``
    points into [tokens of every rank; image embeddings of every rank], the window permutation and the
    merge order into every rank's patches, and the attention segment ids must not meet another rank's.
    Everything else (tokens, M-RoPE ids, labels, pixels, rotary ids) is already per sample."""
    if dp == 1:
        return inputs
    bsz, seq = np.shape(inputs["input_ids"])
    tokens = bsz * seq
    n_patches = int(np.shape(inputs["pixel_values"])[0])
    n_embeds = int(np.shape(inputs["vision_reverse_index"])[0])
    out = dict(inputs)
    gather = np.asarray(inputs["image_gather_index"])
    out["image_gather_index"] = np.where(gather < tokens, gather + dp_rank * tokens,
                                         dp * tokens + dp_rank * n_embeds + (gather - tokens)).astype(gather.dtype)
    for name, offset in (("vision_window_index", n_patches), ("vision_reverse_index", n_embeds),
                         ("vision_window_seg", n_patches), ("vision_frame_seg", n_patches)):
        arr = np.asarray(inputs[name])
        out[name] = (arr + dp_rank * offset).astype(arr.dtype)   # segment ids < patches: disjoint per rank
    return out

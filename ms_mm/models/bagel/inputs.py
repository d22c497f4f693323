"""Host-side (numpy) preparation of BAGEL's Cell inputs from one packed batch.

The packed batch is what upstream's `PackedDataset.pack_sequence` + `to_tensor` yields (the keys of the
fixture's `inputs.npz`): packed positions of text / ViT / VAE-latent tokens, per-split lengths and
attention modes, loss indexes, ViT patches, padded latents, raw timesteps and the flow noise.

`build_model_inputs` turns it into static-shape arrays for `modeling.Bagel`:
* model row order = [text tokens, ViT tokens, latent tokens] (the MoT routing: the first two groups use
  the understanding weights, the last the generation weights); `row_of_position[p]` is the row of
  packed position p, so anything indexed by packed position is remapped once here;
* ONE additive attention mask [1, 1, S, S] over the packed sequence in row order, built from
  `sample_lens`, `split_lens`, `attn_modes` exactly as upstream's `prepare_attention_mask_per_sample`
  (causal: lower triangle + the whole prefix; full: the split + prefix; noise: the split + prefix, and
  no other token may attend to it), block-diagonal over samples. A batch of upstream's non-flex path
  has no split_lens / attn_modes but `nested_attention_mask_{i}` (0 / -inf) per sample: those are used then;
* a block-diagonal ViT mask per image (`vit_token_seqlens`, upstream's cu_seqlens);
* the latent patchify `c (h p) (w q) -> (h w) (p q c)` of each image's top-left (h*p, w*p) crop as a
  gather index into the flattened `padded_latent`;
* CE / MSE rows and per-token weights (1 / number of loss tokens, the training loop's reduction).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

__all__ = ["MODEL_INPUT_NAMES", "BATCH_KEYS", "MASK_VALUE", "build_model_inputs", "attention_mask_per_sample",
           "effective_timesteps"]

# additive mask value: exp() underflows to exactly 0 in fp32 and adding it never overflows
MASK_VALUE = -1e30

MODEL_INPUT_NAMES = (
    "text_ids", "vit_pixels", "vit_position_ids", "vit_attention_mask",
    "padded_latent", "latent_gather_index", "latent_position_ids", "timesteps", "noise",
    "position_ids", "attention_mask",
    "ce_rows", "ce_labels", "ce_weights", "mse_rows", "mse_latent_rows", "mse_weights",
)

BATCH_KEYS = (
    "sequence_length", "sample_lens", "packed_text_ids", "packed_text_indexes", "packed_position_ids",
    "packed_label_ids", "ce_loss_indexes",
    "packed_vit_tokens", "packed_vit_token_indexes", "packed_vit_position_ids", "vit_token_seqlens",
    "padded_latent", "patchified_vae_latent_shapes", "packed_latent_position_ids", "packed_vae_token_indexes",
    "packed_timesteps", "mse_loss_indexes",
)


def attention_mask_per_sample(split_lens, attn_modes) -> np.ndarray:
    """Boolean [L, L] "may attend" matrix of one sample (upstream `prepare_attention_mask_per_sample`)."""
    total = int(sum(split_lens))
    allowed = np.zeros((total, total), dtype=bool)
    start = 0
    for n, mode in zip(split_lens, attn_modes):
        n = int(n)
        if mode not in ("causal", "full", "noise"):
            raise ValueError(f"attn_modes: unknown mode {mode!r} (expected causal, full or noise)")
        allowed[start:start + n, :start] = True
        block = np.tril(np.ones((n, n), dtype=bool)) if mode == "causal" else np.ones((n, n), dtype=bool)
        allowed[start:start + n, start:start + n] = block
        start += n
    start = 0
    for n, mode in zip(split_lens, attn_modes):
        n = int(n)
        if mode == "noise":
            allowed[:, start:start + n] = False
            allowed[start:start + n, start:start + n] = True
        start += n
    return allowed


def effective_timesteps(raw: np.ndarray, shift: float) -> np.ndarray:
    """t = shift * s / (1 + (shift - 1) * s), s = sigmoid(raw), in fp32 (as the model computes it)."""
    raw = np.asarray(raw, np.float32)
    with np.errstate(over="ignore"):
        s = (1.0 / (1.0 + np.exp(-raw))).astype(np.float32)
    return (np.float32(shift) * s / (np.float32(1.0) + np.float32(shift - 1.0) * s)).astype(np.float32)


def _ints(batch, key):
    return np.asarray(batch[key]).astype(np.int64).reshape(-1)


def _block_diagonal(lengths, allowed_blocks=None) -> np.ndarray:
    total = int(sum(lengths))
    allowed = np.zeros((total, total), dtype=bool)
    start = 0
    for i, n in enumerate(lengths):
        n = int(n)
        allowed[start:start + n, start:start + n] = True if allowed_blocks is None else allowed_blocks[i]
        start += n
    return allowed


def _additive(allowed: np.ndarray) -> np.ndarray:
    return np.where(allowed, np.float32(0.0), np.float32(MASK_VALUE)).astype(np.float32)[None, None]


def _sample_masks(batch, sample_lens):
    """Per-sample boolean "may attend" matrices, from split_lens + attn_modes (or the nested masks)."""
    if "split_lens" not in batch or "attn_modes" not in batch:
        keys = [f"nested_attention_mask_{i}" for i in range(len(sample_lens))]
        if not all(k in batch for k in keys):
            raise ValueError("missing key(s) ['split_lens', 'attn_modes'] (or one nested_attention_mask_{i} per "
                             "sample)")
        masks = [np.asarray(batch[k]) == 0 for k in keys]
        for k, m, n in zip(keys, masks, sample_lens):
            if m.shape != (n, n):
                raise ValueError(f"{k} has shape {list(m.shape)}, expected [{n}, {n}] (sample_lens)")
        return masks
    split_lens = _ints(batch, "split_lens")
    attn_modes = [str(m) for m in np.asarray(batch["attn_modes"]).reshape(-1)]
    if len(attn_modes) != len(split_lens):
        raise ValueError(f"attn_modes has {len(attn_modes)} entries, split_lens {len(split_lens)}")
    if int(split_lens.sum()) != int(sample_lens.sum()):
        raise ValueError(f"split_lens sum {int(split_lens.sum())} differs from sequence_length {int(sample_lens.sum())}")
    masks = []
    bounds = np.concatenate([[0], np.cumsum(split_lens)])
    sample_bounds = np.concatenate([[0], np.cumsum(sample_lens)])
    for a, b in zip(sample_bounds[:-1], sample_bounds[1:]):
        sel = [i for i in range(len(split_lens)) if bounds[i] >= a and bounds[i + 1] <= b]
        if sum(int(split_lens[i]) for i in sel) != b - a:
            raise ValueError(f"split_lens do not tile the sample spanning positions [{a}, {b})")
        masks.append(attention_mask_per_sample(split_lens[sel], [attn_modes[i] for i in sel]))
    return masks


def build_model_inputs(batch: Dict[str, np.ndarray], config, rng: Optional[np.random.Generator] = None
                       ) -> Dict[str, np.ndarray]:
    """Packed batch -> {name: array} with every `MODEL_INPUT_NAMES` key, plus the host-side
    `row_of_position` [S] (row of each packed position: ``hidden[row_of_position]`` is packed order).

    `noise` [n_latent_tokens, p*p*z] is taken from the batch; without it, it is drawn from `rng`.
    Raises ValueError naming the offending key.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    seq_len = int(np.asarray(batch["sequence_length"]).reshape(()))
    sample_lens = _ints(batch, "sample_lens")
    if int(sample_lens.sum()) != seq_len:
        raise ValueError(f"sample_lens sum {int(sample_lens.sum())} differs from sequence_length {seq_len}")
    per_sample = _sample_masks(batch, sample_lens)

    text_idx = _ints(batch, "packed_text_indexes")
    vit_idx = _ints(batch, "packed_vit_token_indexes")
    vae_idx = _ints(batch, "packed_vae_token_indexes")
    order = np.concatenate([text_idx, vit_idx, vae_idx])
    if order.size != seq_len or not np.array_equal(np.sort(order), np.arange(seq_len)):
        raise ValueError("packed_text_indexes + packed_vit_token_indexes + packed_vae_token_indexes must cover "
                         f"every packed position 0..{seq_len - 1} exactly once")
    row_of_position = np.empty(seq_len, np.int64)
    row_of_position[order] = np.arange(seq_len)
    n_und = text_idx.size + vit_idx.size

    # joint attention mask: per-sample masks, block-diagonal over samples, then into row order
    allowed = _block_diagonal(sample_lens, per_sample)[np.ix_(order, order)]

    # ViT: patches attend within their own image
    vit_pixels = np.asarray(batch["packed_vit_tokens"], np.float32)
    vit_lens = _ints(batch, "vit_token_seqlens")
    if int(vit_lens.sum()) != vit_pixels.shape[0] or vit_idx.size != vit_pixels.shape[0]:
        raise ValueError(f"vit_token_seqlens sum {int(vit_lens.sum())} / packed_vit_token_indexes "
                         f"{vit_idx.size} differ from packed_vit_tokens rows {vit_pixels.shape[0]}")
    if vit_pixels.shape[1] != config.vit.patch_dim:
        raise ValueError(f"packed_vit_tokens has {vit_pixels.shape[1]} columns, expected "
                         f"3*patch_size^2 = {config.vit.patch_dim}")

    # latent patchify as a gather into padded_latent.reshape(-1)
    latent = np.asarray(batch["padded_latent"], np.float32)
    if latent.ndim != 4 or latent.shape[1] != config.vae.z_channels:
        raise ValueError(f"padded_latent has shape {list(latent.shape)}, expected [n_images, "
                         f"z_channels={config.vae.z_channels}, H, W]")
    n_img, z, H, W = latent.shape
    p = config.latent_patch_size
    shapes = np.asarray(batch["patchified_vae_latent_shapes"]).astype(np.int64).reshape(-1, 2)
    if shapes.shape[0] != n_img:
        raise ValueError(f"patchified_vae_latent_shapes lists {shapes.shape[0]} images, padded_latent has {n_img}")
    pp, qq, cc = np.meshgrid(np.arange(p), np.arange(p), np.arange(z), indexing="ij")
    pp, qq, cc = pp.reshape(-1), qq.reshape(-1), cc.reshape(-1)            # feature order (p q c)
    gathers = []
    for i, (h, w) in enumerate(shapes):
        if h * p > H or w * p > W:
            raise ValueError(f"patchified_vae_latent_shapes[{i}] = ({h}, {w}) x patch {p} exceeds padded_latent "
                             f"{H}x{W}")
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hh, ww = hh.reshape(-1, 1), ww.reshape(-1, 1)                     # token order (h w)
        gathers.append(((i * z + cc) * H + hh * p + pp) * W + ww * p + qq)
    gather_index = np.concatenate(gathers, 0) if gathers else np.zeros((0, p * p * z), np.int64)
    n_latent = gather_index.shape[0]
    if vae_idx.size != n_latent:
        raise ValueError(f"packed_vae_token_indexes has {vae_idx.size} entries, the latent shapes give {n_latent}")
    timesteps = np.asarray(batch["packed_timesteps"], np.float32).reshape(-1)
    latent_pos = _ints(batch, "packed_latent_position_ids")
    if timesteps.size != n_latent or latent_pos.size != n_latent:
        raise ValueError(f"packed_timesteps ({timesteps.size}) / packed_latent_position_ids ({latent_pos.size}) "
                         f"must have one entry per latent token ({n_latent})")
    if latent_pos.size and latent_pos.max() >= config.max_latent_size ** 2:
        raise ValueError(f"packed_latent_position_ids reach {latent_pos.max()}, beyond max_latent_size^2 = "
                         f"{config.max_latent_size ** 2}")
    vit_pos = _ints(batch, "packed_vit_position_ids")
    if vit_pos.size != vit_idx.size:
        raise ValueError(f"packed_vit_position_ids has {vit_pos.size} entries, expected {vit_idx.size}")
    if vit_pos.size and vit_pos.max() >= config.vit_max_num_patch_per_side ** 2:
        raise ValueError(f"packed_vit_position_ids reach {vit_pos.max()}, beyond vit_max_num_patch_per_side^2 = "
                         f"{config.vit_max_num_patch_per_side ** 2}")
    if "noise" in batch:
        noise = np.asarray(batch["noise"], np.float32)
    elif rng is not None:
        noise = rng.standard_normal((n_latent, p * p * z)).astype(np.float32)
    else:
        raise ValueError("missing key 'noise' (the flow-matching noise [n_latent_tokens, p*p*z]) and no rng given")
    if noise.shape != (n_latent, p * p * z):
        raise ValueError(f"noise has shape {list(noise.shape)}, expected {[n_latent, p * p * z]}")

    text_ids = _ints(batch, "packed_text_ids")
    if text_ids.size != text_idx.size:
        raise ValueError(f"packed_text_ids ({text_ids.size}) and packed_text_indexes ({text_idx.size}) differ")
    if text_ids.size and (text_ids.min() < 0 or text_ids.max() >= config.llm.vocab_size):
        raise ValueError(f"packed_text_ids outside [0, vocab_size={config.llm.vocab_size})")
    positions = _ints(batch, "packed_position_ids")
    if positions.size != seq_len:
        raise ValueError(f"packed_position_ids has {positions.size} entries, expected sequence_length {seq_len}")

    ce_idx = _ints(batch, "ce_loss_indexes")
    labels = _ints(batch, "packed_label_ids")
    if ce_idx.size != labels.size:
        raise ValueError(f"ce_loss_indexes ({ce_idx.size}) and packed_label_ids ({labels.size}) differ")
    ce_rows = row_of_position[ce_idx]
    mse_idx = _ints(batch, "mse_loss_indexes")
    mse_rows = row_of_position[mse_idx]
    if mse_rows.size and mse_rows.min() < n_und:
        raise ValueError("mse_loss_indexes must point at VAE-latent tokens (packed_vae_token_indexes)")
    # upstream pairs the predictions at mse_loss_indexes with target[t > 0] (noised latent tokens)
    mse_latent_rows = np.nonzero(effective_timesteps(timesteps, config.timestep_shift) > 0)[0]
    if mse_latent_rows.size != mse_rows.size:
        raise ValueError(f"mse_loss_indexes has {mse_rows.size} entries but {mse_latent_rows.size} latent tokens "
                         f"are noised (sigmoid(packed_timesteps) > 0)")

    def weights(n):
        return np.full(n, 1.0 / n if n else 0.0, np.float32)

    return {
        "text_ids": text_ids.astype(np.int32),
        "vit_pixels": vit_pixels,
        "vit_position_ids": vit_pos.astype(np.int32),
        "vit_attention_mask": _additive(_block_diagonal(vit_lens)),
        "padded_latent": latent,
        "latent_gather_index": gather_index.astype(np.int32),
        "latent_position_ids": latent_pos.astype(np.int32),
        "timesteps": timesteps,
        "noise": noise,
        "position_ids": positions[order].astype(np.int32),
        "attention_mask": _additive(allowed),
        "ce_rows": ce_rows.astype(np.int32),
        "ce_labels": labels.astype(np.int32),
        "ce_weights": weights(ce_rows.size),
        "mse_rows": mse_rows.astype(np.int32),
        "mse_latent_rows": mse_latent_rows.astype(np.int32),
        "mse_weights": weights(mse_rows.size),
        "row_of_position": row_of_position,
    }

"""Host-side (numpy) preparation of Lumina-mGPT 2.0 model inputs, and the image-token layout.

Sequences follow upstream's item processors (FlexARItemProcessor + MMConvItemProcessor with the
``Conversation`` template): ``<s>``, then every turn followed by the separator ``<reserved08706>``;
the answer turns (and their separators) are the targets, everything else is labelled -100. An image
is ``<racm3:break>``, ``grid(H/32)``, ``grid(W/32)``, then H/8 rows of (W/8 codes + code_offset,
``<reserved08799>``), then ``<eoss>``; ``grid(n)`` = ``<reserved0{8800+n}>``. Batches are right-padded
with id 0 and label -100 after truncation to ``max_position_embeddings``, exactly as
``ChameleonXLLMXForConditionalGeneration.forward`` does.

`build_model_inputs(batch, config)` returns the arrays named by `MODEL_INPUT_NAMES`, in that order
the arguments of `LuminaMGPT2ForCausalLM.construct`.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from ms_mm.models.lumina_mgpt2.config import LuminaMGPT2Config, LuminaTokenConfig

__all__ = ["MODEL_INPUT_NAMES", "IGNORE_INDEX", "build_model_inputs", "pad_batch", "image_token_ids",
           "parse_image_tokens", "conversation_sequence", "t2i_sequence"]

MODEL_INPUT_NAMES = ("input_ids", "labels", "position_ids")
IGNORE_INDEX = -100
PAD_ID = 0  # upstream pads input ids with 0 (<s>), not with pad_token_id; the labels mask them


def image_token_ids(codes_hw: np.ndarray, tokens: LuminaTokenConfig) -> List[int]:
    """MoVQGAN codes [H/8, W/8] -> the image's token ids (start, two grid counts, rows + newline, end)."""
    codes = np.asarray(codes_hw)
    if codes.ndim != 2:
        raise ValueError(f"image_token_ids: codes_hw must be 2-D [H/8, W/8], got shape {list(codes.shape)}")
    per_grid = tokens.patch_size // tokens.downsample
    h, w = codes.shape
    if h % per_grid or w % per_grid:
        raise ValueError(f"image_token_ids: code grid {h}x{w} is not a whole number of {per_grid}x{per_grid} "
                         f"grids ({tokens.patch_size} px / {tokens.downsample} px per code)")
    if codes.size and (codes.min() < 0 or codes.max() >= tokens.codebook_size):
        raise ValueError(f"image_token_ids: codes must lie in [0, {tokens.codebook_size}), got "
                         f"[{codes.min()}, {codes.max()}]")
    rows = np.concatenate([codes.astype(np.int64) + tokens.code_offset,
                           np.full((h, 1), tokens.newline_id, np.int64)], axis=1)
    return ([tokens.image_start_id, tokens.grid_base_id + h // per_grid, tokens.grid_base_id + w // per_grid]
            + rows.reshape(-1).tolist() + [tokens.image_end_id])


def parse_image_tokens(ids: Sequence[int], tokens: LuminaTokenConfig) -> Tuple[np.ndarray, int, int]:
    """The inverse of `image_token_ids` (start / end tokens optional): -> (codes_hw, h_grids, w_grids)."""
    ids = [int(t) for t in ids]
    if ids and ids[0] == tokens.image_start_id:
        ids = ids[1:]
    if ids and ids[-1] == tokens.image_end_id:
        ids = ids[:-1]
    if len(ids) < 2:
        raise ValueError("parse_image_tokens: no grid-count tokens")
    h_grids, w_grids = ids[0] - tokens.grid_base_id, ids[1] - tokens.grid_base_id
    per_grid = tokens.patch_size // tokens.downsample
    h, w = h_grids * per_grid, w_grids * per_grid
    body = np.asarray(ids[2:], np.int64)
    if h_grids <= 0 or w_grids <= 0 or body.size != h * (w + 1):
        raise ValueError(f"parse_image_tokens: grids {h_grids}x{w_grids} need {h * (w + 1)} row tokens, "
                         f"got {body.size}")
    body = body.reshape(h, w + 1)
    if not (body[:, -1] == tokens.newline_id).all():
        raise ValueError("parse_image_tokens: a row does not end with the newline token")
    return body[:, :-1] - tokens.code_offset, h_grids, w_grids


def conversation_sequence(turns: Sequence[Sequence[int]], tokens: LuminaTokenConfig, bos_id: int,
                          predict: Sequence[bool] = None) -> Tuple[List[int], List[int]]:
    """``<s>`` + each turn + separator; ``predict[i]`` (default: odd turns, the assistant's) marks the
    turns whose ids and separator are targets. -> (input ids, labels)."""
    predict = [i % 2 == 1 for i in range(len(turns))] if predict is None else list(predict)
    if len(predict) != len(turns):
        raise ValueError(f"conversation_sequence: {len(turns)} turns but {len(predict)} predict flags")
    ids, labels = [int(bos_id)], [IGNORE_INDEX]
    for turn, target in zip(turns, predict):
        piece = [int(t) for t in turn] + [tokens.separator_id]
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    return ids, labels


def t2i_sequence(prompt_ids: Sequence[int], codes_hw: np.ndarray, tokens: LuminaTokenConfig,
                 bos_id: int) -> Tuple[List[int], List[int]]:
    """A text-to-image training sample: the prompt turn, then the image as the answer turn."""
    return conversation_sequence([prompt_ids, image_token_ids(codes_hw, tokens)], tokens, bos_id)


def pad_batch(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
              max_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Truncate to min(longest, max_len), right-pad ids with 0 and labels with -100 -> int64 [B, S]."""
    if len(input_ids) != len(labels) or not input_ids:
        raise ValueError(f"pad_batch: {len(input_ids)} id lists and {len(labels)} label lists (need equal, > 0)")
    for i, (a, b) in enumerate(zip(input_ids, labels)):
        if len(a) != len(b):
            raise ValueError(f"pad_batch: sample {i} has {len(a)} ids but {len(b)} labels")
    s = min(max(len(a) for a in input_ids), max_len)
    ids = np.full((len(input_ids), s), PAD_ID, np.int64)
    lab = np.full((len(input_ids), s), IGNORE_INDEX, np.int64)
    for i, (a, b) in enumerate(zip(input_ids, labels)):
        n = min(len(a), s)
        ids[i, :n] = a[:n]
        lab[i, :n] = b[:n]
    return ids, lab


def build_model_inputs(batch: Dict[str, Union[np.ndarray, Sequence[Sequence[int]]]],
                       config: LuminaMGPT2Config) -> Dict[str, np.ndarray]:
    """``batch``: ``input_ids`` and ``labels`` as lists of token lists (padded here) or as padded
    [B, S] arrays (truncated to max_position_embeddings). -> int32 arrays under MODEL_INPUT_NAMES."""
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise ValueError(f"build_model_inputs: batch lacks {missing} (has {sorted(batch)})")
    ids, lab = batch["input_ids"], batch["labels"]
    if isinstance(ids, np.ndarray) and ids.ndim == 2:
        lab = np.asarray(lab)
        if lab.shape != ids.shape:
            raise ValueError(f"build_model_inputs: labels {list(lab.shape)} vs input_ids {list(ids.shape)}")
        s = min(ids.shape[1], config.max_position_embeddings)
        ids, lab = ids[:, :s], lab[:, :s]
    else:
        ids, lab = pad_batch(ids, lab, config.max_position_embeddings)
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise ValueError(f"build_model_inputs: input_ids must lie in [0, {config.vocab_size}), got "
                         f"[{ids.min()}, {ids.max()}]")
    bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= config.vocab_size))
    if bad.any():
        raise ValueError(f"build_model_inputs: labels must be -100 or in [0, {config.vocab_size}); "
                         f"found {np.unique(lab[bad])[:5].tolist()}")
    b, s = ids.shape
    position_ids = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
    return {"input_ids": ids.astype(np.int32), "labels": lab.astype(np.int32), "position_ids": position_ids}

"""Text-to-image sampling from a Lumina-mGPT 2.0 checkpoint.

    python -m ms_mm.models.lumina_mgpt2.sample --load SAVE_PATH --prompt "A red circle ..." --out img.png \\
        [--mm-model model.json] [--movqgan DIR] [--width W --height H] [--cfg 3.0] [--top-k 2000] \\
        [--temperature 1.0] [--seed 0] [--no-cache]

`--load` is a training save dir (its latest iteration; `SAVE/model.json` is the model json it was
trained with) or a converted checkpoint (then give `--mm-model`). The prompt is the human turn of
the training template ("Generate an image of WxH according to the following prompt:\\n..."), then
the image is generated as upstream's inference solver does it:

* `<racm3:break>` and the two grid-count tokens (height, width in 32 px grids) are forced from
  `--width` / `--height`; after each row of W/8 codes the newline token is forced, after H/8 rows
  `<eoss>`; in between only image codes may be drawn;
* classifier-free guidance: logits = uncond + cfg * (cond - uncond), the unconditional branch
  being the image tokens alone (upstream: the sequence from `<racm3:break>` on);
* top-k, then temperature, then a draw from the softmax;
* a KV cache (`LuminaDecoder.construct_cached`, the training Cells with a fixed-size cache): each
  token costs one single-position forward, whatever came before; `--no-cache` re-runs the whole
  sequence every token (the reference, and the benchmark's baseline).
The codes are decoded by MoVQGAN (`--movqgan`, else the model json's `movqgan_path`) to a PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ms_mm.models.lumina_mgpt2.processing import t2i_prompt

__all__ = ["LuminaSampler", "top_k_filter", "main"]


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Every logit below the k-th largest set to -inf (k <= 0 or >= size: unchanged)."""
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


class SampleError(ValueError):
    """A bad argument or checkpoint: one line."""


class LuminaSampler:
    """A loaded decoder + text tokenizer + MoVQGAN; `generate(prompt, width, height)` -> codes, image."""

    def __init__(self, model, tokenizer, movqgan=None):
        self.model = model
        self.decoder = model.text_decoder
        self.config = model.config
        self.tokens = model.config.tokens
        self.tokenizer = tokenizer
        self.movqgan = movqgan
        from ms_mm.models.lumina_mgpt2.modeling import LuminaGenerationStep

        self.step = LuminaGenerationStep(self.decoder)   # the cached forward of the training Cells

    # ------------------------------------------------------------------ sequence pieces
    def prompt_ids(self, prompt: str, width: int, height: int) -> List[int]:
        t = self.tokens
        per = t.patch_size
        head = [t.image_start_id, t.grid_base_id + height // per, t.grid_base_id + width // per]
        text = self.tokenizer.encode(t2i_prompt(prompt, width, height))
        return [self.config.bos_token_id] + text + [t.separator_id] + head

    def uncond_ids(self, width: int, height: int) -> List[int]:
        t = self.tokens
        return [t.image_start_id, t.grid_base_id + height // t.patch_size, t.grid_base_id + width // t.patch_size]

    def check_size(self, width: int, height: int, prompt_len: int) -> None:
        t = self.tokens
        for name, v in (("--width", width), ("--height", height)):
            if v <= 0 or v % t.patch_size:
                raise SampleError(f"{name} {v}: must be a positive multiple of the {t.patch_size} px grid")
        total = prompt_len + (height // t.downsample) * (width // t.downsample + 1) + 1
        if total > self.config.max_position_embeddings:
            raise SampleError(f"a {width}x{height} image after a {prompt_len}-token prompt needs {total} positions, "
                              f"more than max_position_embeddings={self.config.max_position_embeddings}")

    # ------------------------------------------------------------------ logits
    def _full(self, seq: List[int], max_len: int) -> np.ndarray:
        """No cache: the whole sequence (padded to max_len: one graph) through `construct`."""
        import mindspore as ms

        ids = np.zeros((1, max_len), np.int32)
        ids[0, :len(seq)] = seq
        pos = np.arange(max_len, dtype=np.int32)[None]
        return self.decoder(ms.Tensor(ids), ms.Tensor(pos)).asnumpy()[0, len(seq) - 1]

    def _cached(self, ids: List[int], cache, start: int, max_len: int):
        """The cached step (`LuminaGenerationStep`) for `ids` at [start, start + len): (last logits, cache)."""
        import mindspore as ms

        from ms_mm.models.lumina_mgpt2.modeling import cache_step_inputs

        pos, mask, write = cache_step_inputs(start, len(ids), 1, max_len)
        # the caches travel as mutable tuples: values, not constants baked into (and recompiling) the graph
        logits, k, v = self.step(ms.Tensor(np.asarray([ids], np.int32)), ms.Tensor(pos), ms.Tensor(mask),
                                 ms.Tensor(write), ms.mutable(tuple(cache[0])), ms.mutable(tuple(cache[1])))
        return logits.asnumpy()[0, -1], (k, v)

    def generate(self, prompt: str, width: int, height: int, cfg: float = 3.0, top_k: int = 2000,
                 temperature: float = 1.0, seed: int = 0, use_cache: bool = True) -> Dict[str, object]:
        """-> {"codes" [H/8, W/8], "tokens" (the image's token ids), "seconds", "tokens_per_s"}."""
        if temperature <= 0:
            raise SampleError(f"--temperature must be > 0, got {temperature}")
        t = self.tokens
        cond = self.prompt_ids(prompt, width, height)
        self.check_size(width, height, len(cond))
        branches = [cond] + ([self.uncond_ids(width, height)] if cfg != 1.0 else [])
        rows, cols = height // t.downsample, width // t.downsample
        n_new = rows * (cols + 1)
        max_len = len(cond) + n_new          # one cache length (and one decode graph) for both branches
        rng = np.random.default_rng(seed)
        code_lo, code_hi = t.code_offset, t.code_offset + t.codebook_size
        self.decoder.set_train(False)
        caches, last = [], []
        t_prefill = time.time()
        for ids in branches:
            if use_cache:
                lg, cache = self._cached(ids, self.decoder.new_cache(1, max_len), 0, max_len)
                caches.append(cache)
            else:
                lg = self._full(ids, max_len)
            last.append(lg)
        if use_cache:   # compile the one-token graph now, so the timed loop is decoding only
            self._cached([t.image_start_id], self.decoder.new_cache(1, max_len), 0, max_len)
        t_prefill = time.time() - t_prefill
        seqs = [list(ids) for ids in branches]
        out: List[int] = []
        codes = np.zeros((rows, cols), np.int64)
        t0 = time.time()
        for step in range(n_new):
            r, c = divmod(step, cols + 1)
            if c == cols:
                tok = t.newline_id                      # forced: the row ends
            else:
                lg = last[0] if len(last) == 1 else last[1] + cfg * (last[0] - last[1])
                lg = lg[code_lo:code_hi].astype(np.float64)   # only image codes in a row
                lg = top_k_filter(lg, top_k) / temperature
                p = np.exp(lg - lg.max())
                p /= p.sum()
                code = int(rng.choice(p.size, p=p))
                codes[r, c] = code
                tok = code_lo + code
            out.append(tok)
            if step == n_new - 1:
                break
            for b, seq in enumerate(seqs):
                seq.append(tok)
                if use_cache:
                    last[b], caches[b] = self._cached([tok], caches[b], len(seq) - 1, max_len)
                else:
                    last[b] = self._full(seq, max_len)
        dt = time.time() - t0
        tokens = self.uncond_ids(width, height) + out + [t.image_end_id]
        return {"codes": codes, "tokens": tokens, "seconds": dt, "prefill_seconds": t_prefill,
                "tokens_per_s": n_new / dt if dt > 0 else 0.0}

    def decode(self, codes: np.ndarray):
        """codes [h, w] -> PIL image (MoVQGAN decode_code, [-1, 1] -> uint8)."""
        import mindspore as ms
        from PIL import Image

        from ms_mm.models.lumina_mgpt2.movqgan import MoVQGANDetokenizer

        if self.movqgan is None:
            raise SampleError("no MoVQGAN to decode with: give --movqgan DIR (or movqgan_path in the model json)")
        h, w = codes.shape
        img = MoVQGANDetokenizer(self.movqgan, h, w)(ms.Tensor(codes.reshape(1, h * w).astype(np.int32))).asnumpy()[0]
        img = np.clip((img.transpose(1, 2, 0) + 1) * 127.5, 0, 255).round().astype(np.uint8)
        return Image.fromarray(img, "RGB")


def _model_json(load: Path, explicit: Optional[str]) -> dict:
    path = Path(explicit) if explicit else load / "model.json"
    if not path.is_file():
        raise SampleError(f"{path} not found: give --mm-model (the model json the checkpoint was trained with)"
                          if not explicit else f"--mm-model {path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SampleError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def load_sampler(load, mm_model: Optional[str] = None, movqgan: Optional[str] = None) -> LuminaSampler:
    from ms_mm.models.lumina_mgpt2.config import config_from_json
    from ms_mm.models.lumina_mgpt2.features import ExtractionError, load_movqgan
    from ms_mm.models.lumina_mgpt2.modeling import LuminaMGPT2ForCausalLM
    from ms_mm.models.lumina_mgpt2.processing import TextTokenizer
    from ms_mm.training.checkpointing import TrainCheckpointError, load_model_weights

    load = Path(load)
    if not (load / "latest_checkpointed_iteration.txt").is_file():
        raise SampleError(f"--load {load}: not a checkpoint directory (no latest_checkpointed_iteration.txt)")
    model_json = _model_json(load, mm_model)
    try:
        config = config_from_json(model_json)
    except (ValueError, TypeError) as e:
        raise SampleError(f"model json: {e}") from None
    model = LuminaMGPT2ForCausalLM(config)
    try:
        load_model_weights(model, str(load))
    except TrainCheckpointError as e:
        raise SampleError(str(e)) from None
    vocab_dir = model_json.get("vocabulary_map_path")
    if not vocab_dir:
        raise SampleError("the model json has no vocabulary_map_path (the checkpoint dir with the tokenizer)")
    tokenizer = TextTokenizer(vocab_dir)
    movq_dir = movqgan or model_json.get("movqgan_path")
    movq = None
    if movq_dir:
        try:
            movq = load_movqgan(movq_dir)
        except ExtractionError as e:
            raise SampleError(str(e)) from None
        if movq.config.n_embed != config.tokens.codebook_size:
            raise SampleError(f"MoVQGAN {movq_dir} has {movq.config.n_embed} codes, the model's vocabulary "
                              f"{config.tokens.codebook_size}")
    return LuminaSampler(model, tokenizer, movq)


def _default_side(sampler: LuminaSampler, prompt: str) -> int:
    """The largest square (multiple of the grid, at most 512 px) that fits the context."""
    side = 512
    while side > sampler.tokens.patch_size:
        try:
            sampler.check_size(side, side, len(sampler.prompt_ids(prompt, side, side)))
            return side
        except SampleError:
            side -= sampler.tokens.patch_size
    return side


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ms_mm.models.lumina_mgpt2.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mm-model")
    p.add_argument("--movqgan")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence per token")
    a = p.parse_args(argv)
    try:
        import mindspore as ms

        from ms_mm.training.trainer import device_target

        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device(device_target())
        sampler = load_sampler(a.load, a.mm_model, a.movqgan)
        side = _default_side(sampler, a.prompt) if a.width is None or a.height is None else None
        width, height = a.width or side, a.height or side
        res = sampler.generate(a.prompt, width, height, a.cfg, a.top_k, a.temperature, a.seed, not a.no_cache)
        img = sampler.decode(res["codes"])
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        img.save(a.out, format="PNG")
    except (SampleError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[ms-mm] wrote {a.out} ({width}x{height}, {len(res['tokens'])} image tokens, "
          f"{res['tokens_per_s']:.1f} tokens/s {'with' if not a.no_cache else 'without'} the KV cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

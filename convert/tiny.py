"""Tiny random models in the upstream HF on-disk layout (the examples' embedded default).

    python -m convert.tiny qwen2_5_vl --out DIR [--seed N]

writes `config.json` (transformers 4.57.1 form: `text_config` + `vision_config`),
`model.safetensors` (HF names, fp32), `generation_config.json` and the tokenizer / processor
files of `ms_mm/assets/qwen2vl_tokenizer/`. The weights come from the family spec's own
name/shape table (`write_random_hf`), so the same writer also makes the large synthetic
checkpoints of `bench/bench_convert.py` and the memory test — streamed, one tensor at a time.

Init (as the fixtures, but with zero biases and unit norms — fine for training): Linear / Conv
weights ~ N(0, 1/fan_in), token embeddings ~ N(0, 1), norm weights 1, biases 0.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from adapters.spec import expand_rules
from convert.framework import INDEX_FILE
from convert.registry import get_spec
from ms_mm.training.mm_checkpoint import BF16, SafetensorsWriter

__all__ = ["QWEN2_5_VL_TINY", "write_random_hf", "build_tiny", "ASSETS"]

ASSETS = Path(__file__).resolve().parent.parent / "ms_mm" / "assets" / "qwen2vl_tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                    "added_tokens.json", "special_tokens_map.json", "preprocessor_config.json")


def qwen2_5_vl_tiny_config(special: Dict[str, Any]) -> Dict[str, Any]:
    """HF 4.57.1 config.json of the tiny Qwen2.5-VL; token ids from the tokenizer's special ids.

    LLM: hidden 128, 4 heads (kv 2, head_dim 32), 2 layers, MLP 256. ViT: hidden 64, 2 heads,
    depth 4 with full attention in block 3 only; window_size 56 px = 2x2 merged units, so images
    above 56 px (the demo images are up to 112 px) really are cut into several windows.
    """
    vocab = int(special.get("vocab_size") or special.get("tokenizer_size"))
    ids = {k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "image_token_id",
                                   "video_token_id", "vision_start_token_id", "vision_end_token_id",
                                   "vision_token_id") if k in special}
    text = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl_text",
        "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 256,
        "initializer_range": 0.02, "max_position_embeddings": 2048, "max_window_layers": 80,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"},
        "rope_theta": 10000.0, "sliding_window": None, "use_cache": True, "use_sliding_window": False,
        "layer_types": ["full_attention"] * 2, "vocab_size": vocab,
        "bos_token_id": ids.get("bos_token_id"), "eos_token_id": ids.get("eos_token_id"),
    }
    vision = {
        "model_type": "qwen2_5_vl", "depth": 4, "fullatt_block_indexes": [3], "hidden_act": "silu",
        "hidden_size": 64, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 128,
        "num_heads": 2, "out_hidden_size": 128, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "tokens_per_second": 2, "window_size": 56,
    }
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "dtype": "float32", "tie_word_embeddings": False, "transformers_version": "4.57.1",
            **ids, "text_config": text, "vision_config": vision}


def _fast_fill(shape, dtype) -> np.ndarray:
    # content does not matter (benchmarks, memory tests): one allocation, not constant
    if dtype == BF16:
        return np.resize(np.arange(0x3C00, 0x3C00 + 1021, dtype=np.uint16), shape).view(BF16)
    return np.resize((np.arange(1021, dtype=np.float32) / 1021 - 0.5), shape)


def _init(name: str, shape, rng: np.random.Generator, fill: str) -> np.ndarray:
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    if len(shape) == 1:  # RMSNorm weights
        return np.ones(shape, np.float32)
    if "embed_tokens" in name:
        return rng.standard_normal(shape, dtype=np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    # round to nearest even, as torch does when casting fp32 → bf16
    u = x.astype(np.float32).view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return r.view(BF16)


def write_random_hf(out_dir, hf_config: Dict[str, Any], family: str = "qwen2_5_vl", seed: int = 0,
                    dtype: str = "float32", fill: str = "random", max_shard_bytes: Optional[int] = None) -> Path:
    """Write `config.json` + random weights (every tensor the family spec expects, HF names)."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if fill not in ("random", "fast"):
        raise ValueError(f"fill must be 'random' or 'fast', got {fill!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = get_spec(family)
    config = spec.config_from_hf(hf_config)
    rules = expand_rules(spec.rules(config), spec.layer_counts(config))
    unshaped = [r.mm for r in rules if r.hf_shapes is None]
    if unshaped:
        raise ValueError(f"the {family} spec gives no hf_shapes for {unshaped[:3]}: cannot make random weights")
    rng = np.random.default_rng(seed)
    item = 2 if dtype == "bfloat16" else 4
    np_dtype = BF16 if dtype == "bfloat16" else np.dtype(np.float32)
    tensors = [(h, tuple(s)) for r in rules for h, s in zip(r.hf, r.hf_shapes)]
    shards, size = [[]], 0
    for h, s in tensors:
        nbytes = int(np.prod(s)) * item
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((h, s))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, shard in zip(names, shards):
        with SafetensorsWriter(out / fname, [(h, s, np_dtype) for h, s in shard], {"format": "pt"}) as w:
            for h, s in shard:
                if fill == "fast":
                    w.write(h, _fast_fill(s, np_dtype))
                    continue
                arr = _init(h, s, rng, fill)
                w.write(h, _to_bf16(arr) if dtype == "bfloat16" else arr)
    if n > 1:
        total = sum(int(np.prod(s)) * item for h, s in tensors)
        weight_map = {h: fname for fname, shard in zip(names, shards) for h, _ in shard}
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    cfg = dict(hf_config)
    cfg["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def build_tiny(family: str, out_dir, seed: int = 0, assets: Optional[Path] = None) -> Path:
    """The tiny model of `family` + tokenizer/processor files, ready for `mm-convert ... hf_to_mm`."""
    if family != "qwen2_5_vl":
        raise ValueError(f"no tiny builder for family {family!r} (available: qwen2_5_vl)")
    assets = Path(assets) if assets else ASSETS
    special_path = assets / "special_ids.json"
    if not special_path.is_file():
        raise FileNotFoundError(f"{special_path} not found: the tokenizer assets are needed for the vocab size")
    special = json.loads(special_path.read_text())
    out = Path(out_dir)
    write_random_hf(out, qwen2_5_vl_tiny_config(special), family, seed)
    for name in _TOKENIZER_FILES + ("special_ids.json",):
        if (assets / name).is_file():
            shutil.copy2(assets / name, out / name)
    gen = {"bos_token_id": special.get("bos_token_id"), "eos_token_id": special.get("eos_token_id"),
           "pad_token_id": special.get("pad_token_id"), "transformers_version": "4.57.1"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=["qwen2_5_vl"])
    p.add_argument("--out", required=True, help="output directory (HF layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", default=None, help="tokenizer/processor dir (default: ms_mm/assets/qwen2vl_tokenizer)")
    a = p.parse_args(argv)
    out = build_tiny(a.family, a.out, a.seed, a.assets)
    print(f"wrote tiny {a.family} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiny random models in the upstream HF on-disk layout (the examples' embedded default).

    python -m convert.tiny qwen2_5_vl --out DIR [--seed N]
    python -m convert.tiny deepseek_vl2 --out DIR [--seed N] [--mha] [--assets TOKENIZER_DIR]

qwen2_5_vl writes `config.json` (transformers 4.57.1 form: `text_config` + `vision_config`),
`model.safetensors` (HF names, fp32), `generation_config.json` and the tokenizer / processor
files of `ms_mm/assets/qwen2vl_tokenizer/`. deepseek_vl2 writes the official release layout
(`config.json` with `vision_config` / `projector_config` / `language_config`, model_type
`deepseek_vl_v2`; `model.safetensors` with `vision.*`, `projector.layers.*`, `language.*` names),
`processor_config.json` matching the config, and the tokenizer files of
`ms_mm/assets/deepseek_vl2_tokenizer/` (or `--assets`). The weights come from the family spec's own
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

from convert.spec import expand_rules
from convert.framework import INDEX_FILE
from convert.registry import get_spec
from ms_mm.training.mm_checkpoint import BF16, SafetensorsWriter

__all__ = ["write_random_hf", "build_tiny", "ASSETS", "DEEPSEEK_VL2_ASSETS", "deepseek_vl2_tiny_config",
           "qwen2_5_vl_tiny_config"]

ASSETS = Path(__file__).resolve().parent.parent / "ms_mm" / "assets" / "qwen2vl_tokenizer"
DEEPSEEK_VL2_ASSETS = Path(__file__).resolve().parent.parent / "ms_mm" / "assets" / "deepseek_vl2_tokenizer"
_DEEPSEEK_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "chat_template.jinja", "tokenizer.model", "special_ids.json")
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
    if name in ("image_newline", "view_seperator"):  # DeepSeek-VL2: randn(n_embed) / sqrt(n_embed) upstream
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32)
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


def _tokenizer_special_ids(tokenizer_json: Path) -> Dict[str, int]:
    """{token text: id} of a tokenizer.json's added tokens, plus "_size" = highest id + 1."""
    try:
        tok = json.loads(tokenizer_json.read_text())
        vocab = tok["model"]["vocab"]
        ids = vocab.values() if isinstance(vocab, dict) else range(len(vocab))
        added = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{tokenizer_json}: cannot read the vocabulary ({type(e).__name__}: {e})") from e
    added["_size"] = max(list(ids) + list(added.values())) + 1
    return added


DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", \
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "<\uff5c\u2581pad\u2581\uff5c>"


def deepseek_vl2_tiny_config(vocab_size: int, bos: int, eos: int, pad: int, mla: bool = True,
                             candidate_resolutions=None, patch_size: int = 14,
                             downsample_ratio: int = 2) -> Dict[str, Any]:
    """Official-layout config.json of the tiny DeepSeek-VL2 (MoE + MLA, or plain MHA with `mla=False`).

    Vision: tiles of the smallest candidate resolution (default 112 px: 8x8 patches of 14), width
    64, 2 blocks. Projector: 2x2 downsample MLP. LLM: hidden 128, 3 layers (layer 0 dense, 1-2 MoE
    with 8 routed experts top-2 + 1 shared), MLA heads 4 (kv_lora 64, qk_nope 32, qk_rope 16, v 32).
    Small enough to learn the demo data in minutes on 2 CPU cores, big enough that EP 2/4/8 and
    TP 2/4 split it.
    """
    language = {
        "model_type": "deepseek_v2", "vocab_size": int(vocab_size), "hidden_size": 128, "intermediate_size": 256,
        "moe_intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "scoring_func": "softmax",
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "aux_loss_alpha": 0.001, "seq_aux": True,
        "ep_size": 1, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": int(bos), "eos_token_id": int(eos), "pad_token_id": int(pad),
    }
    if mla:
        language.update(use_mla=True, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                        v_head_dim=32)
    else:  # as deepseek-vl2-tiny's config.json: MLA fields present but null / 0
        language.update(use_mla=False, q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0,
                        v_head_dim=0)
    if candidate_resolutions is None:
        t = 112
        candidate_resolutions = [[t, t], [t, 2 * t], [2 * t, t], [2 * t, 2 * t], [t, 3 * t], [3 * t, t]]
    tile = int(np.gcd.reduce(np.asarray(candidate_resolutions, dtype=np.int64).ravel()))  # the tile side
    return {
        "architectures": ["DeepseekVLV2ForCausalLM"], "model_type": "deepseek_vl_v2", "torch_dtype": "float32",
        "tile_tag": "2D", "global_view_pos": "head",
        "candidate_resolutions": [list(map(int, r)) for r in candidate_resolutions],
        "vision_config": {"model_type": "vision", "model_name": "siglip_so400m_patch14_384", "image_size": tile,
                          "patch_size": int(patch_size), "width": 64, "layers": 2, "heads": 2, "mlp_ratio": 2.0,
                          "global_pool": "map", "ignore_head": True, "class_token": False, "num_classes": 0,
                          "use_checkpoint": False, "weight_init": "skip"},
        "projector_config": {"model_type": "mlp_projector", "projector_type": "downsample_mlp_gelu",
                             "input_dim": 64, "n_embed": 128, "depth": 2, "mlp_ratio": 1,
                             "downsample_ratio": int(downsample_ratio),
                             "token_pooling": False},
        "language_config": language,
    }


def _build_deepseek_vl2(out: Path, seed: int, assets: Path, mla: bool) -> Path:
    tok_json = assets / "tokenizer.json"
    if not tok_json.is_file():
        raise FileNotFoundError(f"{tok_json} not found: the DeepSeek-VL2 tokenizer files are needed for the "
                                f"vocabulary (give --assets DIR with tokenizer.json)")
    special = _tokenizer_special_ids(tok_json)
    missing = [t for t in (DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD) if t not in special]
    if missing:
        raise ValueError(f"{tok_json}: special token(s) {missing} not among its added tokens")
    vocab = -(-special["_size"] // 64) * 64  # padded like the released vocabularies (TP-divisible)
    # the model's tiling follows the bundled processor config, so the processor the examples load
    # from the assets and the model agree on tiles and image-token counts
    proc_path = assets / "processor_config.json"
    proc = json.loads(proc_path.read_text()) if proc_path.is_file() else {}
    tiling = {k: proc[k] for k in ("candidate_resolutions", "patch_size", "downsample_ratio") if k in proc}
    hf_config = deepseek_vl2_tiny_config(vocab, special[DEEPSEEK_BOS], special[DEEPSEEK_EOS],
                                         special[DEEPSEEK_PAD], mla, **tiling)
    write_random_hf(out, hf_config, "deepseek_vl2", seed)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("dtype", None)  # the official config names it torch_dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in _DEEPSEEK_TOKENIZER_FILES:
        if (assets / name).is_file():
            shutil.copyfile(assets / name, out / name)  # contents only: assets may be read-only
    proc = proc or {
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "normalize": True, "image_token": "<image>",
        "pad_token": DEEPSEEK_PAD, "add_special_token": False, "sft_format": "deepseek", "mask_prompt": True,
        "ignore_id": -100, "processor_class": "DeepseekVLV2Processor"}
    proc.update(candidate_resolutions=hf_config["candidate_resolutions"],
                patch_size=hf_config["vision_config"]["patch_size"],
                downsample_ratio=hf_config["projector_config"]["downsample_ratio"])
    (out / "processor_config.json").write_text(json.dumps(proc, indent=1) + "\n")
    gen = {"bos_token_id": special[DEEPSEEK_BOS], "eos_token_id": special[DEEPSEEK_EOS],
           "pad_token_id": special[DEEPSEEK_PAD], "_from_model_config": True}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


TINY_FAMILIES = ("qwen2_5_vl", "deepseek_vl2")


def build_tiny(family: str, out_dir, seed: int = 0, assets: Optional[Path] = None, mla: bool = True) -> Path:
    """The tiny model of `family` + tokenizer/processor files, ready for `mm-convert ... hf_to_mm`.

    `mla=False` (deepseek_vl2 only) makes the plain-MHA variant, as deepseek-vl2-tiny.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny builder for family {family!r} (available: {', '.join(TINY_FAMILIES)})")
    out = Path(out_dir)
    if family == "deepseek_vl2":
        return _build_deepseek_vl2(out, seed, Path(assets) if assets else DEEPSEEK_VL2_ASSETS, mla)
    if not mla:
        raise ValueError("mla=False (--mha) applies to deepseek_vl2 only")
    assets = Path(assets) if assets else ASSETS
    special_path = assets / "special_ids.json"
    if not special_path.is_file():
        raise FileNotFoundError(f"{special_path} not found: the tokenizer assets are needed for the vocab size")
    special = json.loads(special_path.read_text())
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
    p.add_argument("family", choices=list(TINY_FAMILIES))
    p.add_argument("--out", required=True, help="output directory (HF layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assets", default=None,
                   help="tokenizer/processor dir (default: ms_mm/assets/qwen2vl_tokenizer or "
                        "ms_mm/assets/deepseek_vl2_tokenizer)")
    p.add_argument("--mha", action="store_true", help="deepseek_vl2: plain multi-head attention instead of MLA "
                                                      "(as deepseek-vl2-tiny)")
    a = p.parse_args(argv)
    if a.mha and a.family != "deepseek_vl2":
        p.error("--mha applies to deepseek_vl2 only")
    try:
        out = build_tiny(a.family, a.out, a.seed, a.assets, mla=not a.mha)
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m convert.tiny: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote tiny {a.family} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

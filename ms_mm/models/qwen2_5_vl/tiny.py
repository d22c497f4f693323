"""The tiny Qwen2.5-VL of the embedded default: HF 4.57.1 layout, random weights, bundled tokenizer.

    python -m convert.tiny qwen2_5_vl --out DIR [--seed N] [--assets TOKENIZER_DIR]

writes `config.json` (transformers 4.57.1 form: `text_config` + `vision_config`), `model.safetensors`
(HF names, fp32), `generation_config.json` and the tokenizer / processor files of
`ms_mm/models/qwen2_5_vl/assets/`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from convert.tiny import write_random_hf
from ms_mm.models.qwen2_5_vl.tokenizer import ASSET_DIR

ASSETS = ASSET_DIR
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


def build_tiny(out: Path, seed: int = 0, assets: Optional[Path] = None) -> Path:
    """The tiny model + tokenizer/processor files in `out`, ready for `mm-convert ... hf_to_mm`."""
    out = Path(out)
    assets = Path(assets) if assets else ASSETS
    special_path = assets / "special_ids.json"
    if not special_path.is_file():
        raise FileNotFoundError(f"{special_path} not found: the tokenizer assets are needed for the vocab size")
    special = json.loads(special_path.read_text())
    write_random_hf(out, qwen2_5_vl_tiny_config(special), "qwen2_5_vl", seed)
    for name in _TOKENIZER_FILES + ("special_ids.json",):
        if (assets / name).is_file():
            shutil.copy2(assets / name, out / name)
    gen = {"bos_token_id": special.get("bos_token_id"), "eos_token_id": special.get("eos_token_id"),
           "pad_token_id": special.get("pad_token_id"), "transformers_version": "4.57.1"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out

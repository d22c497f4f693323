"""The tiny Lumina-mGPT 2.0 and tiny MoVQGAN of the embedded default, in the release layouts.

    python -m convert.tiny lumina_mgpt2 --out DIR [--seed N] [--assets TOKENIZER_DIR]
    python -m convert.tiny movqgan --out DIR [--seed N]

Lumina: `config.json` (model_type `chameleon`, ChameleonXLLMXConfig fields, the tokenizer's whole
vocabulary as `vocabulary_map`, so the image-layout ids resolve by name), `model.safetensors`
(`model.*` / `lm_head.*`, `convert.tiny.write_random_hf` from the LuminaConverter spec) and the
bundled tokenizer files. MoVQGAN: `movqgan_config.json` (the fixture's tiny ddconfig: 4 levels of
32 channels, downsample 8, 64 codes) + `model.safetensors` in `MOVQ.state_dict()` names.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_hf_config(vocabulary_map: Dict[str, int], special: Dict[str, int]) -> Dict[str, Any]:
    """ChameleonXLLMXConfig-style config.json of the tiny decoder around a tokenizer's vocabulary."""
    vocab_size = -(-(max(vocabulary_map.values()) + 1) // 64) * 64
    return {
        "architectures": ["ChameleonXLLMXForConditionalGeneration"], "model_type": "chameleon",
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "model_parallel_size": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "swin_norm": False, "z_loss_weight": 1e-5, "mask_image_logits": False, "dropout": 0.0,
        "attention_dropout": 0.0, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": special["bos_token_id"], "eos_token_id": special["eos_token_id"],
        "pad_token_id": special["pad_token_id"], "vocabulary_map": dict(vocabulary_map),
    }


def build_tiny(out, seed: int = 0, assets: Optional[Path] = None) -> Path:
    """The tiny decoder + tokenizer files in `out` (HF layout, ready for `mm-convert LuminaConverter hf_to_mm`)."""
    from convert.tiny import write_random_hf
    from ms_mm.models.lumina_mgpt2.tokenizer import ASSET_DIR, vocabulary_map

    out = Path(out)
    assets = Path(assets) if assets else ASSET_DIR
    if not (assets / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{assets / 'tokenizer.json'} not found: the tiny Lumina model is built around a "
                                f"tokenizer's vocabulary (give --assets DIR)")
    vocab = vocabulary_map(assets)
    special = {"bos_token_id": vocab["<s>"], "eos_token_id": vocab["</s>"], "pad_token_id": vocab["<pad>"]}
    write_random_hf(out, tiny_hf_config(vocab, special), "lumina_mgpt2", seed)
    for name in TOKENIZER_FILES:
        if (assets / name).is_file():
            shutil.copyfile(assets / name, out / name)
    return out


def tiny_movqgan_release_config() -> Dict[str, Any]:
    from ms_mm.models.lumina_mgpt2.movqgan_config import MoVQGANConfig

    c = MoVQGANConfig.preset("tiny").to_dict()
    dd = {k: c[k] for k in ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                            "num_res_blocks", "attn_resolutions", "dropout")}
    return {"ddconfig": dd, "n_embed": c["n_embed"], "embed_dim": c["embed_dim"], "beta": c["beta"],
            "legacy": c["legacy"], "remap": None}


def build_tiny_movqgan(out, seed: int = 0, assets: Optional[Path] = None) -> Path:
    """The tiny MoVQGAN in `out`: movqgan_config.json + model.safetensors (random weights)."""
    from convert.tiny import write_random_hf
    from ms_mm.models.lumina_mgpt2.movqgan_config import CONFIG_FILE

    out = Path(out)
    cfg = tiny_movqgan_release_config()
    write_random_hf(out, cfg, "movqgan", seed)
    (out / "config.json").unlink()            # write_random_hf's copy; the release names it movqgan_config.json
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out

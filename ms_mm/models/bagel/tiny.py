"""The tiny BAGEL of the embedded default, in the release layout (as `ByteDance-Seed/BAGEL-7B-MoT`).

    python -m convert.tiny bagel --out DIR [--seed N] [--assets TOKENIZER_DIR]

writes `llm_config.json` (Qwen2 + qk_norm + `layer_module: Qwen2MoTDecoderLayer`), `vit_config.json`
(SigLIP; `num_hidden_layers` one more than used, as the release), `ae_config.json` (the tiny FLUX
AutoEncoderParams), `bagel_config.json` (BagelConfig fields, special ids, loss weights),
`ema.safetensors` (LLM, ViT, connector, generation heads, the frozen 2-D sin-cos tables),
`ae.safetensors` (the VAE) and the tokenizer files of `ms_mm/models/bagel/assets/` (or `--assets`).
The sizes are `BagelConfig.preset("tiny")` (those of the shared parity fixture) with the token ids of
the tokenizer. Weights: Linear / Conv ~ N(0, 1/fan_in), norms 1, biases 0, token embeddings N(0, 1),
`llm2vae` 0 (as upstream's init), the position tables the sin-cos values the model expects.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ms_mm.models.bagel.config import BagelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json")


def tiny_config(special: dict) -> BagelConfig:
    config = BagelConfig.preset("tiny")
    for key in ("bos_token_id", "eos_token_id", "start_of_image", "end_of_image"):
        setattr(config, key, int(special[key]))
    config.llm.vocab_size = int(special["vocab_size"])
    return config.validate()


def release_configs(config: BagelConfig) -> dict:
    """{file name: dict} of the release's config files for `config`."""
    llm, vit, vae = config.llm, config.vit, config.vae
    llm_json = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": llm.vocab_size,
                "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
                "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
                "num_key_value_heads": llm.num_key_value_heads, "rms_norm_eps": llm.rms_norm_eps,
                "rope_theta": llm.rope_theta, "max_position_embeddings": llm.max_position_embeddings,
                "hidden_act": "silu", "tie_word_embeddings": False, "qk_norm": True,
                "layer_module": "Qwen2MoTDecoderLayer", "freeze_und": False, "is_causal": True,
                "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "torch_dtype": "float32"}
    vit_json = {"model_type": "siglip_vision_model", "hidden_size": vit.hidden_size,
                "intermediate_size": vit.intermediate_size,
                "num_hidden_layers": vit.num_hidden_layers - 1 - config.vit_select_layer,
                "num_attention_heads": vit.num_attention_heads, "num_channels": vit.num_channels,
                "image_size": vit.image_size, "patch_size": vit.patch_size, "hidden_act": vit.hidden_act,
                "layer_norm_eps": vit.layer_norm_eps, "rope": False}
    ae_json = {k: getattr(vae, k) for k in ("resolution", "in_channels", "downsample", "ch", "out_ch", "ch_mult",
                                            "num_res_blocks", "z_channels", "scale_factor", "shift_factor")}
    bagel_json = {k: getattr(config, k) for k in ("visual_gen", "visual_und", "latent_patch_size", "max_latent_size",
                                                  "vit_max_num_patch_per_side", "connector_act", "interpolate_pos",
                                                  "timestep_shift", "vit_select_layer")}
    bagel_json["special_token_ids"] = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id",
                                                                      "start_of_image", "end_of_image")}
    bagel_json["train"] = {"ce_weight": config.ce_weight, "mse_weight": config.mse_weight}
    return {"llm_config.json": llm_json, "vit_config.json": vit_json, "ae_config.json": ae_json,
            "bagel_config.json": bagel_json}


def _init(name: str, shape, rng, config: BagelConfig) -> np.ndarray:
    from ms_mm.models.bagel.modeling import sincos_2d_table

    if name == "vit_pos_embed.pos_embed":
        return sincos_2d_table(config.llm.hidden_size, config.vit_max_num_patch_per_side)
    if name == "latent_pos_embed.pos_embed":
        return sincos_2d_table(config.llm.hidden_size, config.max_latent_size)
    if name.startswith("llm2vae."):
        return np.zeros(shape, np.float32)
    if name.endswith("embed_tokens.weight") or name.endswith("position_embedding.weight"):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.5)
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)


def build_tiny(out: Path, seed: int = 0, assets: Optional[Path] = None) -> Path:
    """Write the tiny BAGEL checkpoint + tokenizer into `out`; returns `out`."""
    from convert.registry import get_spec
    from convert.spec import expand_rules
    from ms_mm.models.bagel.tokenizer import ASSET_DIR
    from ms_mm.training.mm_checkpoint import SafetensorsWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    assets = Path(assets) if assets else ASSET_DIR
    special_path = assets / "special_ids.json"
    if not special_path.is_file():
        raise FileNotFoundError(f"{special_path} not found: the tokenizer directory must carry special_ids.json "
                                f"(regenerate with `python -m ms_mm.models.bagel.tokenizer DIR`)")
    config = tiny_config(json.loads(special_path.read_text()))
    spec = get_spec("bagel")
    rules = expand_rules(spec.rules(config), spec.layer_counts(config))
    rng = np.random.default_rng(seed)
    files = {}
    for r in rules:
        for h, s in zip(r.hf, r.hf_shapes):
            files.setdefault(spec.hf_weight_file(h), []).append((h, tuple(s)))
    for fname, tensors in files.items():
        with SafetensorsWriter(out / fname, [(h, s, np.dtype(np.float32)) for h, s in tensors],
                               {"format": "pt"}) as w:
            for h, s in tensors:
                w.write(h, _init(h, s, rng, config).reshape(s).astype(np.float32))
    for name, obj in release_configs(config).items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (assets / name).is_file():
            shutil.copyfile(assets / name, out / name)
    return out
